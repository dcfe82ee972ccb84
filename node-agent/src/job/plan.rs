//! The plan: hosts x role counts -> processes with ranks, addresses, ports,
//! certificate identities, parameter shards and per-host firewall rules.
//!
//! It is a pure function of the validated spec, the job id and the mode, so
//! the launcher and every agent compute the same plan independently.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;

use serde::Serialize;

use crate::job::spec::JobSpec;
use crate::net::identity::{Identity, JobId, Role};

/// One process of the job.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedProcess {
    /// Host name (from the job file).
    pub host: String,
    /// Index of the host in the job file.
    pub host_index: usize,
    /// Role.
    pub role: Role,
    /// Rank within the role.
    pub rank: u32,
    /// Address peers reach it at.
    pub address: IpAddr,
    /// Listening port (scheduler and servers).
    pub port: Option<u16>,
    /// Its certificate's URI SAN.
    pub identity: String,
}

impl PlannedProcess {
    /// Listening socket address, for roles that listen.
    pub fn socket(&self) -> Option<SocketAddr> {
        self.port.map(|p| SocketAddr::new(self.address, p))
    }

    /// A short label such as `node1/worker[0]`.
    pub fn label(&self) -> String {
        format!("{}/{}[{}]", self.host, self.role, self.rank)
    }

    /// The name of its job directory inside the job's directory on its host,
    /// and of its log in the run directory (`node1-worker-0`).
    pub fn dir_name(&self) -> String {
        format!("{}-{}-{}", self.host, self.role, self.rank)
    }

    /// The name of a server's Unix-domain socket for the workers of its
    /// host, beside its job directory (`node1-server-0.sock`).
    pub fn socket_name(&self) -> String {
        format!("{}.sock", self.dir_name())
    }
}

/// What one host gets.
#[derive(Debug, Clone, Serialize)]
pub struct HostPlan {
    /// Name.
    pub name: String,
    /// Address.
    pub address: IpAddr,
    /// Ports the job listens on there.
    pub ports: Vec<u16>,
    /// Addresses allowed to reach those ports.
    pub peers: Vec<IpAddr>,
    /// The nftables ruleset installed for the job on that host.
    pub firewall: String,
}

/// The resolved job.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Job id.
    pub job_id: JobId,
    /// Every host mapped onto this machine?
    pub local: bool,
    /// Every process, in host order, then scheduler, servers, workers.
    pub processes: Vec<PlannedProcess>,
    /// Per-host view.
    pub hosts: Vec<HostPlan>,
    /// Parameters of the model.
    pub num_params: usize,
}

/// The name of a job's nftables table.
pub fn firewall_table(job: &JobId) -> String {
    format!("warden_{}", &job.as_str()[..12])
}

impl Plan {
    /// Plans `spec` for job `job_id`. With `local`, every host runs on this
    /// machine at 127.0.0.1 and ports are allocated across all hosts.
    pub fn new(spec: &JobSpec, job_id: &JobId, local: bool) -> Plan {
        let cl = &spec.cluster;
        let mut processes = Vec::new();
        let mut ranks = [0u32; 3];
        let mut global_next = cl.port_start;
        let mut used = BTreeSet::new();
        if let Some(p) = cl.scheduler_port {
            used.insert(p);
        }
        for (hi, h) in cl.hosts.iter().enumerate() {
            let address = if local { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { h.address };
            let mut next = if local { global_next } else { cl.port_start };
            let mut take_port = |pinned: Option<u16>| -> u16 {
                if let Some(p) = pinned {
                    return p;
                }
                while used.contains(&next) {
                    next += 1;
                }
                let p = next;
                next += 1;
                p
            };
            for (role, count) in [(Role::Scheduler, h.scheduler), (Role::Server, h.servers), (Role::Worker, h.workers)]
            {
                for _ in 0..count {
                    let idx = role as usize;
                    let rank = ranks[idx];
                    ranks[idx] += 1;
                    let port = match role {
                        Role::Scheduler => Some(take_port(cl.scheduler_port)),
                        Role::Server => Some(take_port(None)),
                        Role::Worker => None,
                    };
                    let identity = Identity { job: job_id.clone(), role, rank }.uri();
                    processes.push(PlannedProcess {
                        host: h.name.clone(),
                        host_index: hi,
                        role,
                        rank,
                        address,
                        port,
                        identity,
                    });
                }
            }
            if local {
                global_next = next;
            }
        }
        let all_addresses: BTreeSet<IpAddr> = processes.iter().map(|p| p.address).collect();
        let job_ports: BTreeSet<u16> = processes.iter().filter_map(|p| p.port).collect();
        let hosts = cl
            .hosts
            .iter()
            .enumerate()
            .map(|(hi, h)| {
                let ports: Vec<u16> = processes.iter().filter(|p| p.host_index == hi).filter_map(|p| p.port).collect();
                let address = if local { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { h.address };
                let peers: Vec<IpAddr> = all_addresses.iter().copied().collect();
                // Locally, every host is this machine: one table (one uid)
                // serves them all, so each host's rules cover every port.
                let firewall = match local {
                    true => firewall_rules(job_id, &job_ports.iter().copied().collect::<Vec<_>>(), &peers, &job_ports),
                    false => firewall_rules(job_id, &ports, &peers, &job_ports),
                };
                HostPlan { name: h.name.clone(), address, ports, peers, firewall }
            })
            .collect();
        Plan {
            job_id: job_id.clone(),
            local,
            processes,
            hosts,
            num_params: crate::train::model::num_params(&spec.model),
        }
    }

    /// The process with this role and rank.
    pub fn get(&self, role: Role, rank: u32) -> Option<&PlannedProcess> {
        self.processes.iter().find(|p| p.role == role && p.rank == rank)
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &PlannedProcess {
        self.get(Role::Scheduler, 0).expect("validated specs have exactly one scheduler")
    }

    /// Processes of one role in rank order.
    pub fn of_role(&self, role: Role) -> Vec<&PlannedProcess> {
        let mut v: Vec<_> = self.processes.iter().filter(|p| p.role == role).collect();
        v.sort_by_key(|p| p.rank);
        v
    }

    /// Number of processes of a role.
    pub fn count(&self, role: Role) -> u32 {
        self.processes.iter().filter(|p| p.role == role).count() as u32
    }

    /// The flat parameter range server `rank` holds.
    pub fn shard(&self, rank: u32) -> Range<usize> {
        let s = self.count(Role::Server) as usize;
        let r = rank as usize;
        let n = self.num_params;
        (n * r / s)..(n * (r + 1) / s)
    }

    /// The identity of a planned process.
    pub fn identity(&self, role: Role, rank: u32) -> Identity {
        Identity { job: self.job_id.clone(), role, rank }
    }
}

/// The nftables variable that `warden-agent host setup` defines as the uid
/// it leased to the job on the host ([`crate::host::jobuid`]).
pub const JOB_UID_VAR: &str = "job_uid";

/// An nftables ruleset for one host: its listening `ports` accept only the
/// job's `peers` (input), and on this host only the job's uid (or root) may
/// open connections to any of the job's ports `job_ports` on the peers
/// (output: `meta skuid` is known only for locally generated packets, so
/// each host filters its own users). Other local users are refused with a
/// reset, so they cannot hold the job's connection slots.
fn firewall_rules(job: &JobId, ports: &[u16], peers: &[IpAddr], job_ports: &BTreeSet<u16>) -> String {
    firewall_ruleset(&firewall_table(job), ports, peers, job_ports)
}

/// [`firewall_rules`] for a table of any name (the Slurm prolog's).
pub fn firewall_ruleset(table: &str, ports: &[u16], peers: &[IpAddr], job_ports: &BTreeSet<u16>) -> String {
    let list = |ports: &mut dyn Iterator<Item = &u16>| ports.map(u16::to_string).collect::<Vec<_>>().join(", ");
    let v4: Vec<String> = peers.iter().filter(|a| a.is_ipv4()).map(IpAddr::to_string).collect();
    let v6: Vec<String> = peers.iter().filter(|a| a.is_ipv6()).map(IpAddr::to_string).collect();
    let families = [("ip", &v4), ("ip6", &v6)];
    let mut s = format!("table inet {table} {{\n");
    if !ports.is_empty() {
        let ports = list(&mut ports.iter());
        s += "  chain input {\n    type filter hook input priority -10; policy accept;\n";
        for (family, addrs) in families.iter().filter(|(_, a)| !a.is_empty()) {
            s += &format!("    tcp dport {{ {ports} }} {family} saddr {{ {} }} accept\n", addrs.join(", "));
        }
        s += &format!("    tcp dport {{ {ports} }} drop\n  }}\n");
    }
    if !job_ports.is_empty() {
        let ports = list(&mut job_ports.iter());
        s += "  chain output {\n    type filter hook output priority -10; policy accept;\n";
        for (family, addrs) in families.iter().filter(|(_, a)| !a.is_empty()) {
            s += &format!(
                "    tcp dport {{ {ports} }} {family} daddr {{ {} }} tcp flags & (syn | ack) == syn \
                 meta skuid != {{ 0, ${JOB_UID_VAR} }} reject with tcp reset\n",
                addrs.join(", ")
            );
        }
        s += "  }\n";
    }
    s += "}\n";
    s
}

/// The ports a ruleset of [`firewall_ruleset`] admits only the job's peers
/// to (its input chain's), in order; none without an input chain. `None`
/// when the text has an input chain whose ports cannot be read: the caller
/// must not take that for a job listening nowhere.
pub fn ruleset_ports(ruleset: &str) -> Option<Vec<u16>> {
    if !ruleset.lines().any(|l| l.trim() == "chain input {") {
        return Some(Vec::new());
    }
    let list = ruleset.lines().map(str::trim).find_map(|l| l.strip_prefix("tcp dport { ")?.strip_suffix(" } drop"))?;
    list.split(", ").map(|p| p.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rulesets_ports_read_back() {
        let peers = ["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let all = BTreeSet::from([29500, 29501, 29510]);
        let ruleset = firewall_ruleset("t", &[29500, 29510], &peers, &all);
        assert_eq!(ruleset_ports(&ruleset), Some(vec![29500, 29510]));
        let v6 = firewall_ruleset("t", &[29500], &peers[1..], &all);
        assert_eq!(ruleset_ports(&v6), Some(vec![29500]));
        assert_eq!(ruleset_ports(&firewall_ruleset("t", &[29500], &[], &all)), Some(vec![29500]));
        assert_eq!(ruleset_ports(&firewall_ruleset("t", &[], &peers, &all)), Some(Vec::new()));
        // An input chain whose ports cannot be read is not "no ports".
        assert_eq!(ruleset_ports(&ruleset.replace("29510", "29510-29519")), None);
        assert_eq!(ruleset_ports("table inet t {\n  chain input {\n  }\n}\n"), None);
    }

    const JOB: &str = r#"
[job]
name = "p"
[cluster]
user = "warden"
ports = [29500, 29599]
[[cluster.hosts]]
address = "10.0.0.1"
scheduler = 1
servers = 2
workers = 2
[[cluster.hosts]]
address = "10.0.0.2"
servers = 1
workers = 1
[model]
kind = "mlp"
inputs = 784
hidden = [1000, 300]
classes = 10
[data]
format = "idx"
train_images = "a"
train_labels = "b"
[optimizer]
kind = "sgd"
lr = 0.1
[training]
epochs = 1
batch_size = 1
"#;

    #[test]
    fn shards_split_every_tensor_evenly_across_three_servers() {
        let spec = JobSpec::parse("p.toml", JOB, std::path::Path::new(".")).unwrap();
        let plan = Plan::new(&spec, &JobId::generate(), false);
        assert_eq!(plan.count(Role::Server), 3);
        let total = plan.num_params;
        let shards: Vec<_> = (0..3).map(|r| plan.shard(r)).collect();
        // Contiguous, covering, and no server holds more than its share plus
        // one element (the big 784x1000 tensor is split across servers).
        assert_eq!(shards[0].start, 0);
        assert_eq!(shards[2].end, total);
        for w in shards.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for s in &shards {
            assert!(s.len() * 4 <= total * 4 / 3 + 4, "{s:?} of {total}");
        }
        assert!(shards[0].end < 784 * 1000, "the first tensor spans several servers");
    }

    #[test]
    fn ports_ranks_and_firewall() {
        let spec = JobSpec::parse("p.toml", JOB, std::path::Path::new(".")).unwrap();
        let plan = Plan::new(&spec, &JobId::generate(), false);
        let a: Vec<_> = plan.processes.iter().filter(|p| p.host_index == 0).filter_map(|p| p.port).collect();
        let b: Vec<_> = plan.processes.iter().filter(|p| p.host_index == 1).filter_map(|p| p.port).collect();
        assert_eq!(a, vec![29500, 29501, 29502]);
        assert_eq!(b, vec![29500]);
        assert_eq!(plan.get(Role::Server, 2).unwrap().host, "10.0.0.2");
        assert_eq!(plan.get(Role::Worker, 2).unwrap().host, "10.0.0.2");
        let fw = &plan.hosts[1].firewall;
        assert!(fw.contains("tcp dport { 29500 } ip saddr { 10.0.0.1, 10.0.0.2 } accept"), "{fw}");
        assert!(fw.contains("tcp dport { 29500 } drop"), "{fw}");
        // Every host's own users, but the job's uid, are kept off every job port.
        assert!(fw.contains("tcp dport { 29500, 29501, 29502 } ip daddr { 10.0.0.1, 10.0.0.2 }"), "{fw}");
        assert!(fw.contains("meta skuid != { 0, $job_uid } reject"), "{fw}");
        let local = Plan::new(&spec, &JobId::generate(), true);
        let ports: Vec<_> = local.processes.iter().filter_map(|p| p.port).collect();
        assert_eq!(ports, vec![29500, 29501, 29502, 29503]);
    }

    #[test]
    fn a_workers_local_rank_counts_the_workers_on_its_host() {
        use crate::train::kv::WorkerRanks;
        let spec = JobSpec::parse("p.toml", JOB, std::path::Path::new(".")).unwrap();
        let plan = Plan::new(&spec, &JobId::generate(), false);
        let of = |rank| {
            let r = WorkerRanks::of(&plan, rank);
            (r.rank, r.workers, r.local_rank, r.local_workers)
        };
        // Workers 0 and 1 on the first host, worker 2 alone on the second.
        assert_eq!(of(0), (0, 3, 0, 2));
        assert_eq!(of(1), (1, 3, 1, 2));
        assert_eq!(of(2), (2, 3, 0, 1));
    }
}
