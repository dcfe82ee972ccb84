//! `[cluster]`: who runs the job, on which hosts, with which ports and uids.
//!
//! The hosts come from `[[cluster.hosts]]` tables, a hostfile or an Ansible
//! inventory (exactly one of them); whichever it is, every host gets a name
//! that can be part of a file name, a unique address and at least one role,
//! and the job gets exactly one scheduler, a server and a worker.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;

use super::{SpecError, Src, int_in, raw};
use crate::net::identity::Role;

/// `[cluster]`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSpec {
    /// The hostfile or inventory the hosts came from, if not the job file.
    pub hosts_from: Option<PathBuf>,
    /// The account whose primary group training runs with (and, without
    /// root, whose name the warning gives).
    pub user: String,
    /// The range of uids leased to jobs, one per job and host
    /// ([`crate::host::jobuid`]).
    pub uids: (u32, u32),
    /// First port of the job's range.
    pub port_start: u16,
    /// Last port of the job's range (inclusive).
    pub port_end: u16,
    /// Scheduler port, if pinned.
    pub scheduler_port: Option<u16>,
    /// The hosts, in file order.
    pub hosts: Vec<HostSpec>,
    /// An ssh_config file to use instead of the user's (`ssh -F`).
    pub ssh_config: Option<PathBuf>,
    /// Where the agent binary and job directories live on the hosts.
    pub remote_dir: PathBuf,
    /// How remote commands become root.
    pub become_: Become,
    /// How processes of the job on one host reach each other's listeners.
    pub same_host: SameHost,
    /// `[cluster.slurm]`: the hosts are a Slurm allocation's nodes.
    pub slurm: Option<crate::job::slurm::SlurmSpec>,
}

/// `[cluster] become`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Become {
    /// `sudo -n` when the SSH user is not root.
    Auto,
    /// Always `sudo -n`.
    Sudo,
    /// Never: the SSH user runs the agent as itself.
    None,
}

/// `[cluster] same_host`: how a worker reaches a server on its own host.
/// Both ways run the same TLS 1.3 handshake with client certificates and
/// the same records; a Unix-domain socket skips the kernel's TCP stack,
/// which costs more CPU per byte than the AES-GCM of the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SameHost {
    /// The server's Unix-domain socket beside the job directories (the job
    /// uid's, 0600, in a directory of root's: `privfs::bind_socket`).
    Unix,
    /// The server's TCP port, as from another host.
    Tcp,
}

/// One `[[cluster.hosts]]` entry (or a host of a hostfile or inventory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HostSpec {
    /// Name used in logs and plans.
    pub name: String,
    /// Address peers reach it at.
    pub address: IpAddr,
    /// SSH destination (`user@host`, a `~/.ssh/config` alias, ...); default: the address.
    pub ssh: String,
    /// 0 or 1.
    pub scheduler: u32,
    /// Server processes on this host.
    pub servers: u32,
    /// Worker processes on this host.
    pub workers: u32,
    /// SSH private key for this host (an inventory's `ansible_ssh_private_key_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_file: Option<PathBuf>,
}

impl ClusterSpec {
    /// Total processes of a role.
    pub fn count(&self, role: Role) -> u32 {
        self.hosts
            .iter()
            .map(|h| match role {
                Role::Scheduler => h.scheduler,
                Role::Server => h.servers,
                Role::Worker => h.workers,
            })
            .sum()
    }
}

/// Checks `[cluster]` and gathers its hosts; `given` are the hosts of a
/// hostfile or inventory as the launcher already read them.
pub(super) fn convert_cluster(
    src: &Src<'_>,
    cluster: &Spanned<raw::Cluster>,
    base_dir: &Path,
    given: Option<&[HostSpec]>,
) -> Result<ClusterSpec, SpecError> {
    let cl = cluster.get_ref();
    let user = convert_user(src, &cl.user)?;
    let uids = convert_uids(src, cl.uids.as_ref())?;
    let (port_start, port_end, scheduler_port) = convert_ports(src, cl)?;
    check_backend(src, cluster)?;
    let slurm = cl.slurm.as_ref().map(|s| convert_slurm(src, s)).transpose()?;
    let listed = convert_hosts(src, cluster, base_dir, given, slurm.as_ref())?;
    let ssh_config = cl.ssh_config.as_ref().map(|p| base_dir.join(p.get_ref()));
    let remote_dir = match &cl.remote_dir {
        Some(d) if !Path::new(d.get_ref()).is_absolute() => {
            return Err(src.err(
                d.span(),
                "remote_dir must be an absolute path",
                "for example remote_dir = \"/var/lib/warden\"",
            ));
        }
        Some(d) => PathBuf::from(d.get_ref()),
        None => PathBuf::from("/var/lib/warden"),
    };
    let become_ = src.choice(
        cl.become_.as_ref(),
        "become",
        &[("auto", Become::Auto), ("sudo", Become::Sudo), ("none", Become::None)],
        "use \"auto\" (sudo -n unless the SSH user is root), \"sudo\" or \"none\"",
    )?;
    let same_host = src.choice(
        cl.same_host.as_ref(),
        "same_host",
        &[("unix", SameHost::Unix), ("tcp", SameHost::Tcp)],
        "use \"unix\" (a worker reaches a server on its own host through the server's Unix-domain socket) or \"tcp\"",
    )?;
    let cluster = ClusterSpec {
        hosts_from: listed.from,
        user,
        uids,
        port_start,
        port_end,
        scheduler_port,
        hosts: listed.hosts,
        ssh_config,
        remote_dir,
        become_,
        same_host,
        slurm,
    };
    check_roles(src, &cluster, &listed.span, &listed.spans)?;
    Ok(cluster)
}

/// `[cluster] user`: an unprivileged account.
fn convert_user(src: &Src<'_>, user: &Spanned<String>) -> Result<String, SpecError> {
    let name = user.get_ref().trim().to_string();
    if name.is_empty() || name == "root" || name.contains(char::is_whitespace) {
        return Err(src.err(
            user.span(),
            if name == "root" {
                "training must not run as root".to_string()
            } else {
                "user must be a user name".to_string()
            },
            "name an unprivileged account, for example user = \"warden\" (playbooks/node-prep.yml creates it)",
        ));
    }
    Ok(name)
}

/// `[cluster] ports` and `scheduler_port`: the job's port range, from 1024
/// up, and the scheduler's port inside it if pinned.
fn convert_ports(src: &Src<'_>, cl: &raw::Cluster) -> Result<(u16, u16, Option<u16>), SpecError> {
    let ports = cl.ports.get_ref();
    if ports.len() != 2 {
        return Err(src.err(
            cl.ports.span(),
            "ports must be a range of two numbers [first, last]",
            "for example: ports = [29500, 29599]",
        ));
    }
    let port_help = "ports are 1024 to 65535; for example: ports = [29500, 29599]";
    let port_start: u16 = int_in(src, &ports[0], "the first port", 1024, 65535, port_help)?;
    let port_end: u16 = int_in(src, &ports[1], "the last port", 1024, 65535, port_help)?;
    if port_end < port_start {
        return Err(src.err(
            cl.ports.span(),
            format!("port range is empty: {port_start} is after {port_end}"),
            "write the lower port first",
        ));
    }
    let scheduler_port = match &cl.scheduler_port {
        Some(p) => {
            let port: u16 = int_in(src, p, "scheduler_port", 1024, 65535, port_help)?;
            if port < port_start || port > port_end {
                return Err(src.err(
                    p.span(),
                    format!("scheduler_port {port} is outside the job's ports {port_start}-{port_end}"),
                    "pick a port inside `ports`, or leave scheduler_port out",
                ));
            }
            Some(port)
        }
        None => None,
    };
    Ok((port_start, port_end, scheduler_port))
}

/// The hosts of `[cluster]` and where the job file names them.
struct Hosts {
    hosts: Vec<HostSpec>,
    /// Where each host's mistakes are pointed at in the job file.
    spans: Vec<Range<usize>>,
    /// The hostfile or inventory, if the hosts came from one.
    from: Option<PathBuf>,
    /// Where mistakes of the hosts as a whole are pointed at.
    span: Range<usize>,
}

/// The hosts: listed here, or read from a hostfile or an Ansible inventory.
fn convert_hosts(
    src: &Src<'_>,
    cluster: &Spanned<raw::Cluster>,
    base_dir: &Path,
    given: Option<&[HostSpec]>,
    slurm: Option<&crate::job::slurm::SlurmSpec>,
) -> Result<Hosts, SpecError> {
    let cl = cluster.get_ref();
    let sources = [cl.hosts.is_some(), cl.hostfile.is_some(), cl.inventory.is_some(), cl.slurm.is_some()];
    match sources.iter().filter(|x| **x).count() {
        0 => {
            return Err(src.err(
                cluster.span(),
                "the cluster has no hosts",
                "add [[cluster.hosts]] tables, or name a hostfile (hostfile = \"hosts\"), an Ansible inventory (inventory = \"inventory.ini\") or a Slurm allocation ([cluster.slurm] nodes = 2)",
            ));
        }
        1 => {}
        _ => {
            return Err(src.err(
                cluster.span(),
                "the hosts are listed more than one way",
                "keep one of [[cluster.hosts]], hostfile, inventory and [cluster.slurm]",
            ));
        }
    }
    if let (Some(spec), Some(raw)) = (slurm, &cl.slurm) {
        if let Some(s) = &cl.servers_per_host {
            return Err(src.err(
                s.span(),
                "servers_per_host applies to hosts from a hostfile or inventory",
                "set servers_per_node in [cluster.slurm] instead",
            ));
        }
        return hosts_from_slurm(src, raw, spec, given);
    }
    if let (Some(g), None) = (&cl.inventory_group, &cl.inventory) {
        return Err(src.err(
            g.span(),
            "inventory_group needs an inventory",
            "add inventory = \"inventory.ini\", or remove it",
        ));
    }
    match &cl.hosts {
        Some(table) => hosts_from_tables(src, cl, table),
        None => hosts_from_file(src, cl, base_dir, given),
    }
}

/// `[[cluster.hosts]]`: each host once, by name and by address, and each
/// running something.
fn hosts_from_tables(
    src: &Src<'_>,
    cl: &raw::Cluster,
    table: &Spanned<Vec<Spanned<raw::Host>>>,
) -> Result<Hosts, SpecError> {
    if let Some(s) = &cl.servers_per_host {
        return Err(src.err(
            s.span(),
            "servers_per_host applies to hosts from a hostfile or inventory",
            "set servers = N on each [[cluster.hosts]] table instead",
        ));
    }
    if table.get_ref().is_empty() {
        return Err(src.err(table.span(), "the cluster has no hosts", "add a [[cluster.hosts]] table"));
    }
    let mut names = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let mut hosts = Vec::new();
    let mut spans = Vec::new();
    for h in table.get_ref() {
        let hr = h.get_ref();
        let host = table_host(src, hr)?;
        if !names.insert(host.name.clone()) {
            let span = hr.name.as_ref().map_or(hr.address.span(), |n| n.span());
            return Err(src.err(
                span,
                format!("host `{}` is listed twice", host.name),
                "list each host once; give it more servers or workers instead",
            ));
        }
        if !addresses.insert(host.address) {
            return Err(src.err(
                hr.address.span(),
                format!("address {} is used by two hosts", host.address),
                "list each host once; give it more servers or workers instead",
            ));
        }
        if host.scheduler + host.servers + host.workers == 0 {
            return Err(src.err(
                h.span(),
                format!("host `{}` runs nothing", host.name),
                "give it a scheduler, servers or workers, or remove it",
            ));
        }
        hosts.push(host);
        spans.push(h.span());
    }
    Ok(Hosts { hosts, spans, from: None, span: table.span() })
}

/// One `[[cluster.hosts]]` table on its own: its address, name and role counts.
fn table_host(src: &Src<'_>, hr: &raw::Host) -> Result<HostSpec, SpecError> {
    let address: IpAddr = hr.address.get_ref().parse().map_err(|_| {
        src.err(
            hr.address.span(),
            format!("`{}` is not an IP address", hr.address.get_ref()),
            "give the address peers reach this host at, for example address = \"10.0.0.5\"",
        )
    })?;
    let name = hr.name.as_ref().map_or_else(|| address.to_string(), |n| n.get_ref().clone());
    if !is_host_name(&name) {
        let span = hr.name.as_ref().map_or(hr.address.span(), |n| n.span());
        return Err(src.err(span, format!("`{name}` cannot name a host"), HOST_NAME_HELP));
    }
    let count = |v: &Option<Spanned<i64>>, what: &str, hi: i64| -> Result<u32, SpecError> {
        match v {
            Some(v) => int_in(src, v, what, 0, hi, "role counts are whole numbers; 0 leaves the role out"),
            None => Ok(0),
        }
    };
    let scheduler = count(&hr.scheduler, "scheduler", 1)?;
    let servers = count(&hr.servers, "servers", 256)?;
    let workers = count(&hr.workers, "workers", 1024)?;
    let ssh = hr.ssh.as_ref().map_or_else(|| address.to_string(), |s| s.get_ref().clone());
    Ok(HostSpec { name, address, ssh, scheduler, servers, workers, identity_file: None })
}

/// `[cluster] hostfile` or `inventory`: the hosts the launcher sent
/// (`given`), or else the list read here.
fn hosts_from_file(
    src: &Src<'_>,
    cl: &raw::Cluster,
    base_dir: &Path,
    given: Option<&[HostSpec]>,
) -> Result<Hosts, SpecError> {
    let (key, kind) = match (&cl.hostfile, &cl.inventory) {
        (Some(f), _) => (f, ListKind::Hostfile),
        (None, Some(i)) => (i, ListKind::Inventory(cl.inventory_group.as_ref().map(|g| g.get_ref().as_str()))),
        (None, None) => unreachable!("one source was checked to be present"),
    };
    let servers_per_host = match &cl.servers_per_host {
        Some(v) => int_in(src, v, "servers_per_host", 0, 256, "parameter servers on each listed host, 1 by default")?,
        None => 1,
    };
    let path = base_dir.join(key.get_ref());
    let hosts = match given {
        Some(h) => check_given(src, key.span(), h)?,
        None => hosts_from_list(src, key, &path, kind, servers_per_host)?,
    };
    let spans = vec![key.span(); hosts.len()];
    Ok(Hosts { hosts, spans, from: Some(path), span: key.span() })
}

/// Hosts the launcher read (from a list or an allocation) and sent with the
/// job: an agent still refuses what the list itself would have been
/// refused for.
fn check_given(src: &Src<'_>, span: Range<usize>, h: &[HostSpec]) -> Result<Vec<HostSpec>, SpecError> {
    let names: BTreeSet<&str> = h.iter().map(|x| x.name.as_str()).collect();
    let addresses: BTreeSet<IpAddr> = h.iter().map(|x| x.address).collect();
    if h.is_empty() {
        return Err(src.err(span, "no hosts were sent with the job, and agents do not read host lists", ""));
    }
    if names.len() != h.len() || addresses.len() != h.len() {
        return Err(src.err(span, "the hosts sent with the job repeat a name or address", ""));
    }
    if let Some(bad) = h.iter().find(|x| !is_host_name(&x.name)) {
        return Err(src.err(span, format!("`{}` cannot name a host", bad.name), HOST_NAME_HELP));
    }
    Ok(h.to_vec())
}

/// `[cluster.slurm]`: the hosts the launcher sent, else the nodes of the
/// allocation this process runs in, else stand-ins for the nodes `sbatch`
/// will allocate (see [`crate::job::slurm`]).
fn hosts_from_slurm(
    src: &Src<'_>,
    raw: &Spanned<raw::Slurm>,
    spec: &crate::job::slurm::SlurmSpec,
    given: Option<&[HostSpec]>,
) -> Result<Hosts, SpecError> {
    use crate::job::slurm;
    let span = raw.span();
    let hosts = match given {
        Some(h) => check_given(src, span.clone(), h)?,
        None => {
            let nodes = match slurm::allocation() {
                Ok(Some(a)) => a.nodes,
                Ok(None) => slurm::stand_ins(spec),
                Err(e) => return Err(src.err(span, e.to_string(), "")),
            };
            slurm::hosts(spec, &nodes).map_err(|e| {
                src.err(span.clone(), e.to_string(), "allocate at least that many nodes (salloc -N), or lower nodes")
            })?
        }
    };
    if let Some(bad) = hosts.iter().find(|h| !is_host_name(&h.name)) {
        return Err(src.err(span, format!("Slurm node `{}` cannot name a host", bad.name), HOST_NAME_HELP));
    }
    let spans = vec![span.clone(); hosts.len()];
    Ok(Hosts { hosts, spans, from: None, span })
}

/// `[cluster] backend`: how processes start, `"ssh"` (the default) or
/// `"slurm"` (the default with `[cluster.slurm]`, which it needs).
fn check_backend(src: &Src<'_>, cluster: &Spanned<raw::Cluster>) -> Result<(), SpecError> {
    let cl = cluster.get_ref();
    let Some(b) = &cl.backend else { return Ok(()) };
    match (b.get_ref().as_str(), cl.slurm.is_some()) {
        ("slurm", true) | ("ssh", false) => Ok(()),
        ("slurm", false) => Err(src.err(
            b.span(),
            "backend = \"slurm\" needs a [cluster.slurm] table",
            "add [cluster.slurm] with nodes = N (docs/slurm.md), in place of the host list",
        )),
        ("ssh", true) => Err(src.err(
            b.span(),
            "backend = \"ssh\" with a [cluster.slurm] table",
            "remove [cluster.slurm] and list the hosts, or set backend = \"slurm\"",
        )),
        (other, _) => Err(src.err(b.span(), format!("unknown backend `{other}`"), "use \"ssh\" or \"slurm\"")),
    }
}

/// `[cluster.slurm]` on its own.
fn convert_slurm(src: &Src<'_>, raw: &Spanned<raw::Slurm>) -> Result<crate::job::slurm::SlurmSpec, SpecError> {
    let r = raw.get_ref();
    let count = |v: &Option<Spanned<i64>>, what: &str, lo: i64, hi: i64, default: u32| match v {
        Some(v) => int_in(src, v, what, lo, hi, "processes of that role on each allocated node"),
        None => Ok(default),
    };
    // Passed to sbatch as arguments (never through a shell or a script),
    // but a line break or a NUL there is a mistake worth naming.
    let word = |v: &Option<Spanned<String>>, what: &str, help: &str| -> Result<Option<String>, SpecError> {
        match v {
            None => Ok(None),
            Some(v) if v.get_ref().trim().is_empty() || v.get_ref().chars().any(|c| c.is_control() || c == ' ') => {
                Err(src.err(v.span(), format!("{what} must be one word"), help))
            }
            Some(v) => Ok(Some(v.get_ref().clone())),
        }
    };
    let mut sbatch_options = Vec::new();
    for o in r.sbatch_options.iter().flat_map(|l| l.get_ref()) {
        if !o.get_ref().starts_with("--") || o.get_ref().chars().any(char::is_control) {
            return Err(src.err(
                o.span(),
                format!("`{}` is not an sbatch option", o.get_ref()),
                "give each option as one string in its long form, for example sbatch_options = [\"--exclusive\", \"--qos=high\"]",
            ));
        }
        sbatch_options.push(o.get_ref().clone());
    }
    Ok(crate::job::slurm::SlurmSpec {
        nodes: int_in(src, &r.nodes, "nodes", 1, 4096, "the number of nodes to run on, for example nodes = 2")?,
        workers_per_node: count(&r.workers_per_node, "workers_per_node", 0, 1024, 1)?,
        servers_per_node: count(&r.servers_per_node, "servers_per_node", 0, 256, 1)?,
        partition: word(&r.partition, "partition", "for example partition = \"gpu\"")?,
        time: word(&r.time, "time", "a Slurm time limit, for example time = \"02:00:00\"")?,
        account: word(&r.account, "account", "for example account = \"mylab\"")?,
        sbatch_options,
    })
}

/// Exactly one scheduler, at least one server and one worker, and on each
/// host a port of the range for each of its listeners.
fn check_roles(
    src: &Src<'_>,
    cluster: &ClusterSpec,
    hosts_span: &Range<usize>,
    spans: &[Range<usize>],
) -> Result<(), SpecError> {
    let schedulers = cluster.count(Role::Scheduler);
    if schedulers != 1 {
        return Err(src.err(
            hosts_span.clone(),
            format!("the cluster needs exactly one scheduler, but has {schedulers}"),
            "set scheduler = 1 on exactly one host",
        ));
    }
    if cluster.count(Role::Server) == 0 {
        return Err(src.err(hosts_span.clone(), "the cluster has no server", "set servers = 1 (or more) on a host"));
    }
    if cluster.count(Role::Worker) == 0 {
        return Err(src.err(hosts_span.clone(), "the cluster has no worker", "set workers = 1 (or more) on a host"));
    }
    let (port_start, port_end) = (cluster.port_start, cluster.port_end);
    let range = u32::from(port_end - port_start) + 1;
    for (h, span) in cluster.hosts.iter().zip(spans) {
        let listeners = h.scheduler + h.servers;
        if listeners > range {
            return Err(src.err(
                span.clone(),
                format!(
                    "host `{}` needs {listeners} ports (1 per scheduler and server) but the range {port_start}-{port_end} has {range}",
                    h.name
                ),
                "widen [cluster] ports",
            ));
        }
    }
    Ok(())
}

/// `[cluster] uids = [first, last]`: the uids leased to jobs. Never 0,
/// never the ids below 1000 that distributions give to system accounts, at
/// most 2^20 of them, and below 2^32 - 2 (`(uid_t) -1` means "no change").
fn convert_uids(src: &Src<'_>, uids: Option<&Spanned<Vec<Spanned<i64>>>>) -> Result<(u32, u32), SpecError> {
    let Some(uids) = uids else { return Ok(crate::host::jobuid::DEFAULT_RANGE) };
    let help = "for example uids = [2000000000, 2000065535] (the default): a range no account on the hosts uses";
    let [first, last] = uids.get_ref().as_slice() else {
        return Err(src.err(uids.span(), "uids must be a range of two numbers [first, last]", help));
    };
    let first: u32 = int_in(src, first, "the first job uid", 1000, i64::from(u32::MAX - 2), help)?;
    let last: u32 = int_in(src, last, "the last job uid", 1000, i64::from(u32::MAX - 2), help)?;
    if first > last || last - first >= 1 << 20 {
        return Err(src.err(
            uids.span(),
            "uids must be [first, last] with first <= last and at most 1048576 uids",
            help,
        ));
    }
    Ok((first, last))
}

/// Which kind of host list `[cluster]` names.
#[derive(Clone, Copy)]
enum ListKind<'a> {
    Hostfile,
    /// With the group to take (every host when `None`).
    Inventory(Option<&'a str>),
}

/// Reads a hostfile or inventory into hosts: each gets its workers from the
/// list (`slots`, `warden_workers`; 1 by default), `servers_per_host`
/// servers unless the list says otherwise, and the first host the scheduler
/// unless one is marked. Host names without an address are resolved here,
/// on the launcher, once.
fn hosts_from_list(
    src: &Src<'_>,
    key: &Spanned<String>,
    path: &Path,
    kind: ListKind<'_>,
    servers_per_host: u32,
) -> Result<Vec<HostSpec>, SpecError> {
    let what = match kind {
        ListKind::Hostfile => "hostfile",
        ListKind::Inventory(_) => "inventory",
    };
    let cannot_read = |e: std::io::Error| {
        src.err(
            key.span(),
            format!("cannot read the {what} {}: {e}", path.display()),
            "paths are relative to the job file's directory",
        )
    };
    let at = |line: usize, message: String, help: &str| SpecError {
        file: path.display().to_string(),
        line,
        col: 1,
        message,
        help: (!help.is_empty()).then(|| help.to_string()),
    };
    let entries = read_list(path, kind).map_err(|e| match e {
        ListRead::Io(e) => cannot_read(e),
        ListRead::List(e) => at(e.line, e.message, &e.help),
    })?;
    if entries.is_empty() {
        return Err(at(1, format!("the {what} lists no host"), "add a line per host: node1 slots=2"));
    }
    let marked = entries.iter().any(|e| e.scheduler.is_some_and(|s| s > 0));
    let mut hosts: Vec<HostSpec> = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let wanted = e.address.clone().unwrap_or_else(|| e.name.clone());
        let address = match wanted.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => resolve(&wanted).map_err(|why| {
                at(
                    e.line,
                    format!("cannot find the address of `{wanted}`: {why}"),
                    match kind {
                        ListKind::Hostfile => "add address=IP to the line: the address the other hosts reach it at",
                        ListKind::Inventory(_) => "set ansible_host=IP (or warden_address=IP) for the host",
                    },
                )
            })?,
        };
        if let Some(other) = hosts.iter().find(|h| h.address == address) {
            return Err(at(
                e.line,
                format!("`{}` has the address {address}, like `{}`", e.name, other.name),
                "list each machine once; give it more workers instead",
            ));
        }
        if !is_host_name(&e.name) {
            return Err(at(e.line, format!("`{}` cannot name a host", e.name), HOST_NAME_HELP));
        }
        let host = HostSpec {
            scheduler: e.scheduler.unwrap_or(u32::from(!marked && i == 0)),
            servers: e.servers.unwrap_or(servers_per_host),
            workers: e.workers.unwrap_or(1),
            name: e.name,
            address,
            ssh: e.ssh,
            identity_file: e.identity_file.map(PathBuf::from),
        };
        if host.scheduler + host.servers + host.workers == 0 {
            return Err(at(
                e.line,
                format!("host `{}` runs nothing", host.name),
                "give it slots, servers or the scheduler",
            ));
        }
        hosts.push(host);
    }
    Ok(hosts)
}

/// Host names end up in file names (`logs/NAME-worker-0.log`): 1 to 64
/// letters, digits, `-`, `_`, `.` or `:` (an IPv6 address), not starting
/// with a dot.
fn is_host_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

const HOST_NAME_HELP: &str = "host names are 1-64 letters, digits, '-', '_', '.' or ':'";

/// Why a host name has no address here.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    /// The resolver failed.
    #[error("{0}")]
    Lookup(#[source] std::io::Error),
    /// The resolver knows the name but gave no address.
    #[error("no address")]
    NoAddress,
}

/// Why a host list gave no entries: it could not be read, or what it says
/// is wrong.
enum ListRead {
    Io(std::io::Error),
    List(crate::job::inventory::ListError),
}

/// The entries of a hostfile or inventory: INI inventories and hostfiles
/// by warden's readers, any other inventory through Ansible.
fn read_list(path: &Path, kind: ListKind<'_>) -> Result<Vec<crate::job::inventory::Entry>, ListRead> {
    let text = |path: &Path| std::fs::read_to_string(path).map_err(ListRead::Io);
    let group = match kind {
        ListKind::Hostfile => return crate::job::inventory::parse_hostfile(&text(path)?).map_err(ListRead::List),
        ListKind::Inventory(group) => group,
    };
    let meta = std::fs::metadata(path).map_err(ListRead::Io)?;
    let parsed = if meta.is_dir() {
        ansible_inventory(path, group)
    } else {
        let text = text(path)?;
        // A script is executable and says how to run it; an INI file with
        // an execute bit (a checkout, a Windows mount) is still INI.
        let executable = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0;
        if (executable && text.starts_with("#!")) || crate::job::inventory::needs_ansible(path, &text) {
            ansible_inventory(path, group)
        } else {
            crate::job::inventory::parse_inventory(&text, group)
        }
    };
    parsed.map_err(ListRead::List)
}

/// Longest wait for `ansible-inventory` (a dynamic inventory may ask a
/// cloud API): two minutes.
const ANSIBLE_INVENTORY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The hosts of an inventory only Ansible reads (YAML, a directory, a
/// dynamic inventory script or plugin), through `ansible-inventory -i PATH
/// --list` from `PATH`. It runs as the user who runs warden, as Ansible
/// would: a dynamic inventory is the user's own program.
fn ansible_inventory(
    path: &Path,
    group: Option<&str>,
) -> Result<Vec<crate::job::inventory::Entry>, crate::job::inventory::ListError> {
    use crate::job::inventory::ListError;
    let err = |message: String, help: &str| ListError { line: 1, message, help: help.to_string() };
    let mut child = std::process::Command::new("ansible-inventory");
    // A group of its own, so that a timeout ends the inventory script too.
    std::os::unix::process::CommandExt::process_group(&mut child, 0);
    let mut child = child
        .arg("-i")
        .arg(path)
        .arg("--list")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            err(
                format!("this inventory is YAML, a directory or a script, which only Ansible reads, and ansible-inventory cannot be run: {e}"),
                "install Ansible (pip install ansible-core, or apt-get install ansible-core) so ansible-inventory is on PATH, or write the inventory as INI",
            )
        })?;
    // Read both pipes while waiting: a large inventory would fill one.
    let pipe = |p: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut all);
            }
            all
        })
    };
    let out = pipe(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let errs = pipe(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let until = std::time::Instant::now() + ANSIBLE_INVENTORY_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < until => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => return Err(err(format!("cannot wait for ansible-inventory: {e}"), "run it by hand")),
            Ok(None) => {
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                return Err(err(
                    format!(
                        "ansible-inventory -i {} --list did not finish in {} s",
                        path.display(),
                        ANSIBLE_INVENTORY_TIMEOUT.as_secs()
                    ),
                    "run it by hand to see what it waits for",
                ));
            }
        }
    };
    let (stdout, stderr) = (out.join().unwrap_or_default(), errs.join().unwrap_or_default());
    if !status.success() {
        let said = String::from_utf8_lossy(&stderr);
        let last: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
        return Err(err(
            format!(
                "ansible-inventory -i {} --list failed ({status}): {}",
                path.display(),
                last[last.len().saturating_sub(3)..].join(" / ")
            ),
            "run it by hand and fix what it reports",
        ));
    }
    // Ansible warns and lists nothing for a source it cannot parse: say why.
    crate::job::inventory::parse_inventory_json(&String::from_utf8_lossy(&stdout), group).map_err(|mut e| {
        let said = String::from_utf8_lossy(&stderr);
        let warnings: Vec<&str> = said.lines().map(str::trim).filter(|l| l.starts_with("[WARNING]")).take(3).collect();
        if !warnings.is_empty() {
            e.message = format!("{}; ansible-inventory said: {}", e.message, warnings.join(" / "));
        }
        e
    })
}

/// A host name's address as this machine resolves it (IPv4 first).
fn resolve(name: &str) -> Result<IpAddr, ResolveError> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<IpAddr> = (name, 22).to_socket_addrs().map_err(ResolveError::Lookup)?.map(|a| a.ip()).collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or(ResolveError::NoAddress)
}
