//! A cluster of hosts on one machine: one network namespace per host, all
//! attached to a bridge that lives in its own namespace, plus an outsider
//! host on the same bridge that is not part of any job.
//!
//! Addresses are 10.251.0.0/24 inside these namespaces only; the bridge
//! namespace isolates each cluster, so concurrent tests can reuse the
//! subnet. Everything is removed on drop, by name (never by pattern).

use std::net::Ipv4Addr;
use std::process::Command;

/// One test host.
#[derive(Debug, Clone)]
pub struct NetnsHost {
    /// Namespace name.
    pub ns: String,
    /// Its address on the bridge.
    pub addr: Ipv4Addr,
}

/// The namespaces of one test cluster.
#[derive(Debug)]
pub struct NetnsCluster {
    bridge_ns: String,
    /// The job's hosts.
    pub hosts: Vec<NetnsHost>,
    /// A host on the same network that is not part of the job.
    pub outsider: NetnsHost,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetnsCluster {
    /// Creates `hosts` job hosts (10.251.0.10, .11, ...) and an outsider (10.251.0.99).
    pub fn new(tag: &str, hosts: usize) -> Result<NetnsCluster, String> {
        let bridge_ns = format!("wt{tag}br");
        ip(&["netns", "add", &bridge_ns])?;
        let mut cluster = NetnsCluster {
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
            outsider: NetnsHost { ns: format!("wt{tag}out"), addr: Ipv4Addr::new(10, 251, 0, 99) },
        };
        ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"])?;
        let mut all: Vec<NetnsHost> = (0..hosts)
            .map(|i| NetnsHost { ns: format!("wt{tag}h{i}"), addr: Ipv4Addr::new(10, 251, 0, 10 + i as u8) })
            .collect();
        all.push(cluster.outsider.clone());
        for (i, h) in all.iter().enumerate() {
            ip(&["netns", "add", &h.ns])?;
            if h.ns != cluster.outsider.ns {
                cluster.hosts.push(h.clone());
            }
            let port = format!("p{i}");
            ip(&["-n", &h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &bridge_ns])?;
            ip(&["-n", &bridge_ns, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &h.ns, "addr", "add", &format!("{}/24", h.addr), "dev", "eth0"])?;
            ip(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
        }
        Ok(cluster)
    }

    /// Can `from` open a TCP connection to `to:port` within two seconds?
    pub fn can_connect(from: &NetnsHost, to: Ipv4Addr, port: u16) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &from.ns, "timeout", "2", "bash", "-c", &format!("exec 3<>/dev/tcp/{to}/{port}")])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The warden tables in a host's namespace.
    pub fn tables(host: &NetnsHost) -> String {
        let out = Command::new("ip").args(["netns", "exec", &host.ns, "nft", "list", "tables"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        for h in self.hosts.iter().chain(std::iter::once(&self.outsider)) {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.bridge_ns]);
    }
}
