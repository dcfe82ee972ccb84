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

/// Serialises clusters that give the root namespace an address on
/// 10.251.0.0/24 (the uplink): only one may exist at a time.
static UPLINK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl NetnsCluster {
    /// [`NetnsCluster::new`] reachable from this (the root) namespace at
    /// 10.251.0.1 through a veth into the bridge (`wt{tag}up`, deleted by
    /// the caller); the guard keeps other such clusters out meanwhile.
    pub fn with_uplink(
        tag: &str,
        hosts: usize,
    ) -> Result<(NetnsCluster, String, std::sync::MutexGuard<'static, ()>), String> {
        let guard = UPLINK.lock().unwrap_or_else(|p| p.into_inner());
        let net = NetnsCluster::new(tag, hosts)?;
        let uplink = format!("wt{tag}up");
        let port = "pup".to_string();
        ip(&["link", "add", &uplink, "type", "veth", "peer", "name", &port, "netns", &net.bridge_ns])?;
        ip(&["-n", &net.bridge_ns, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["addr", "add", "10.251.0.1/24", "dev", &uplink])?;
        ip(&["link", "set", &uplink, "up"])?;
        Ok((net, uplink, guard))
    }
}

/// Deletes an uplink made by [`NetnsCluster::with_uplink`].
pub fn delete_link(name: &str) {
    let _ = ip(&["link", "del", name]);
}

/// A [`NetnsCluster`] whose hosts run their own `sshd`, reachable from this
/// (the root) namespace through an uplink at 10.251.0.1, with a client key
/// and a known_hosts file made for the test.
pub struct SshCluster {
    /// The namespaces (dropped last).
    pub net: NetnsCluster,
    /// An ssh_config naming the key and known_hosts (for `[cluster] ssh_config`).
    pub ssh_config: std::path::PathBuf,
    sshd: Vec<std::process::Child>,
    uplink: String,
    _guard: std::sync::MutexGuard<'static, ()>,
}

impl std::fmt::Debug for SshCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCluster").field("net", &self.net).finish_non_exhaustive()
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl SshCluster {
    /// `hosts` hosts with sshd, keys under `dir`.
    pub fn new(tag: &str, hosts: usize, dir: &std::path::Path) -> Result<SshCluster, String> {
        let (net, uplink, guard) = NetnsCluster::with_uplink(tag, hosts)?;
        let mut cluster =
            SshCluster { net, ssh_config: dir.join("ssh_config"), sshd: Vec::new(), uplink, _guard: guard };
        let d = |name: &str| dir.join(name).display().to_string();
        run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", &d("id")])?;
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all("/run/sshd").map_err(|e| e.to_string())?;
        let mut known = String::new();
        for (i, h) in cluster.net.hosts.iter().enumerate() {
            let key = d(&format!("hostkey{i}"));
            run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", &key])?;
            let public = std::fs::read_to_string(format!("{key}.pub")).map_err(|e| e.to_string())?;
            let mut parts = public.split_whitespace();
            known += &format!("{} {} {}\n", h.addr, parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let config = d(&format!("sshd{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "ListenAddress {addr}\nPort 22\nHostKey {key}\nPidFile {pid}\nAuthorizedKeysFile {auth}\n\
                     PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     UsePAM no\nStrictModes no\nMaxSessions 64\nMaxStartups 64:30:128\nLogLevel ERROR\n\
                     ClientAliveInterval 2\nClientAliveCountMax 3\n",
                    addr = h.addr,
                    pid = d(&format!("sshd{i}.pid")),
                    auth = d("authorized_keys"),
                ),
            )
            .map_err(|e| e.to_string())?;
            // Like a fresh lab machine, the host's root gets Debian's stock
            // .bashrc, which returns at once for the non-interactive shells
            // that run SSH commands. This build machine's own /root/.bashrc
            // starts pyenv for every shell (160 ms a remote command); that is
            // this machine's setup, not a lab host's. Only this sshd's mount
            // namespace sees the change.
            let sshd = format!("exec ip netns exec {} /usr/sbin/sshd -D -e -f {config}", h.ns);
            let script = if std::path::Path::new("/root/.bashrc").is_file()
                && std::path::Path::new("/etc/skel/.bashrc").is_file()
            {
                format!("mount --bind /etc/skel/.bashrc /root/.bashrc && {sshd}")
            } else {
                sshd
            };
            let child = Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c", &script])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("sshd: {e}"))?;
            cluster.sshd.push(child);
        }
        std::fs::write(dir.join("known_hosts"), known).map_err(|e| e.to_string())?;
        std::fs::write(
            &cluster.ssh_config,
            format!(
                "Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n",
                d("id"),
                d("known_hosts")
            ),
        )
        .map_err(|e| e.to_string())?;
        // Wait until every sshd accepts connections.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for h in &cluster.net.hosts {
            while std::net::TcpStream::connect_timeout(&(h.addr, 22).into(), std::time::Duration::from_millis(200))
                .is_err()
            {
                if std::time::Instant::now() > until {
                    return Err(format!("sshd on {} did not come up", h.addr));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }
}

impl Drop for SshCluster {
    fn drop(&mut self) {
        for c in &mut self.sshd {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["link", "del", &self.uplink]);
    }
}
