//! A real Slurm cluster on this machine: one `slurmd` per network-namespace
//! host (`nsenter --net`, since `ip netns exec` remounts /sys without the
//! cgroup tree slurmd wants), `slurmctld` in this namespace on the uplink
//! address 10.251.0.1, and a `munged` of the cluster's own, all started in
//! the foreground as children of the test and stopped by PID on drop.
//!
//! Debian's `slurmctld`, `slurmd`, `slurm-client` and `munge` provide them
//! (`./scripts/test-all` installs them). Clients need `SLURM_CONF`
//! ([`SlurmCluster::env`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{NetnsCluster, delete_link};

/// slurmctld's and slurmd's ports: off Slurm's defaults, so a Slurm of the
/// machine's own would not be disturbed.
const CTLD_PORT: u16 = 16817;
const SLURMD_PORT: u16 = 16818;

/// A running cluster.
pub struct SlurmCluster {
    /// The hosts (their namespaces are the Slurm nodes, named alike).
    pub net: NetnsCluster,
    /// `slurm.conf`.
    pub conf: PathBuf,
    dir: PathBuf,
    daemons: Vec<Child>,
    munged: Option<Child>,
    uplink: String,
    _guard: std::sync::MutexGuard<'static, ()>,
}

impl std::fmt::Debug for SlurmCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlurmCluster").field("conf", &self.conf).finish_non_exhaustive()
    }
}

fn until(secs: u64, what: &str, mut ready: impl FnMut() -> bool) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(secs);
    while !ready() {
        if Instant::now() > end {
            return Err(format!("{what}: not within {secs}s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn spawn(cmd: &mut Command, what: &str) -> Result<Child, String> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().map_err(|e| {
        format!("cannot start {what} ({e}): install slurmctld slurmd slurm-client munge (./scripts/test-all does)")
    })
}

impl SlurmCluster {
    /// `hosts` nodes of 2 CPUs in one partition, its state in a directory
    /// of its own (`/tmp/wsl-TAG`: slurmstepd's socket paths must stay under
    /// 108 bytes), removed on drop.
    pub fn start(tag: &str, hosts: usize) -> Result<SlurmCluster, String> {
        SlurmCluster::start_with(tag, hosts, None)
    }

    /// [`SlurmCluster::start`] with warden's prolog and epilog installed as
    /// an admin would (`PrologFlags=Alloc`): `agent slurm prolog --ports
    /// FIRST-LAST` and `agent slurm epilog`.
    pub fn with_prolog(tag: &str, hosts: usize, agent: &Path, ports: (u16, u16)) -> Result<SlurmCluster, String> {
        SlurmCluster::start_with(tag, hosts, Some((agent, ports)))
    }

    fn start_with(tag: &str, hosts: usize, prolog: Option<(&Path, (u16, u16))>) -> Result<SlurmCluster, String> {
        let dir = &std::env::temp_dir().join(format!("wsl-{tag}"));
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let (net, uplink, guard) = NetnsCluster::with_uplink(tag, hosts)?;
        let conf = dir.join("slurm.conf");
        let mut cluster = SlurmCluster {
            net,
            conf,
            dir: dir.to_path_buf(),
            daemons: Vec::new(),
            munged: None,
            uplink,
            _guard: guard,
        };
        let d = |name: &str| dir.join(name);
        for sub in ["munge", "state", "log"] {
            std::fs::create_dir_all(d(sub)).map_err(|e| e.to_string())?;
        }
        // munged, as the munge user, with a key of this cluster's.
        let munge = nix::unistd::User::from_name("munge")
            .ok()
            .flatten()
            .ok_or("no `munge` user: install munge (./scripts/test-all does)")?;
        std::os::unix::fs::chown(d("munge"), Some(munge.uid.as_raw()), Some(munge.gid.as_raw()))
            .map_err(|e| e.to_string())?;
        let as_munge = |cmd: &mut Command| {
            use std::os::unix::process::CommandExt;
            cmd.uid(munge.uid.as_raw()).gid(munge.gid.as_raw());
        };
        let key = d("munge/munge.key");
        let mut mk = Command::new("mungekey");
        mk.arg("--create").arg(format!("--keyfile={}", key.display()));
        as_munge(&mut mk);
        let made = mk.output().map_err(|e| format!("mungekey: {e}: install munge (./scripts/test-all does)"))?;
        if !made.status.success() {
            return Err(format!("mungekey: {}", String::from_utf8_lossy(&made.stderr)));
        }
        let socket = d("munge/munge.socket");
        let mut md = Command::new("munged");
        md.arg("--foreground")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--pid-file={}", d("munge/munged.pid").display()))
            .arg(format!("--log-file={}", d("munge/munged.log").display()))
            .arg(format!("--seed-file={}", d("munge/munged.seed").display()));
        as_munge(&mut md);
        cluster.munged = Some(spawn(&mut md, "munged")?);
        until(10, "munged answers", || {
            Command::new("munge")
                .args(["-n", "-S"])
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;

        // slurmctld runs only on the host SlurmctldHost names.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(|e| e.to_string())?.trim().to_string();
        let names: Vec<&str> = cluster.net.hosts.iter().map(|h| h.ns.as_str()).collect();
        let mut text = format!(
            "ClusterName=warden-test\nSlurmctldHost={host}(10.251.0.1)\nSlurmctldPort={CTLD_PORT}\n\
             SlurmdPort={SLURMD_PORT}\nSlurmUser=root\nAuthType=auth/munge\nCredType=cred/munge\n\
             AuthInfo=socket={socket}\nStateSaveLocation={state}\nSlurmdSpoolDir={dir}/spool-%n\n\
             SlurmctldPidFile={dir}/slurmctld.pid\nSlurmdPidFile={dir}/slurmd-%n.pid\n\
             SlurmctldLogFile={dir}/log/slurmctld.log\nSlurmdLogFile={dir}/log/slurmd-%n.log\n\
             MailProg=/bin/true\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n\
             JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\nSchedulerType=sched/builtin\nSelectType=select/cons_tres\n\
             SelectTypeParameters=CR_CPU\nReturnToService=2\nKillWait=2\nInactiveLimit=0\n",
            socket = socket.display(),
            state = d("state").display(),
            dir = dir.display(),
        );
        if let Some((agent, (first, last))) = prolog {
            let script = |name: &str, body: String| -> Result<PathBuf, String> {
                use std::os::unix::fs::PermissionsExt;
                let path = d(name);
                std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).map_err(|e| e.to_string())?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
                Ok(path)
            };
            let a = agent.display();
            let p = script("prolog.sh", format!("exec {a} slurm prolog --ports {first}-{last}"))?;
            let e = script("epilog.sh", format!("exec {a} slurm epilog"))?;
            text += &format!("Prolog={}\nEpilog={}\nPrologFlags=Alloc\n", p.display(), e.display());
        }
        for h in &cluster.net.hosts {
            text += &format!("NodeName={} NodeAddr={} CPUs=2 State=UNKNOWN\n", h.ns, h.addr);
            std::fs::create_dir_all(d(&format!("spool-{}", h.ns))).map_err(|e| e.to_string())?;
        }
        text += &format!("PartitionName=test Nodes={} Default=YES MaxTime=INFINITE State=UP\n", names.join(","));
        std::fs::write(&cluster.conf, text).map_err(|e| e.to_string())?;

        let ctld = spawn(Command::new("slurmctld").arg("-D").arg("-f").arg(&cluster.conf), "slurmctld")?;
        cluster.daemons.push(ctld);
        until(20, "slurmctld answers", || cluster.client("scontrol", &["ping"]).is_ok_and(|o| o.contains("is UP")))?;
        for h in &cluster.net.hosts {
            let slurmd = spawn(
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", h.ns))
                    .args(["slurmd", "-D", "-f"])
                    .arg(&cluster.conf)
                    .args(["-N", &h.ns]),
                "slurmd",
            )?;
            cluster.daemons.push(slurmd);
        }
        for h in &cluster.net.hosts {
            // Exactly `idle`: `idle*` is a node that does not answer.
            until(30, &format!("node {} idle", h.ns), || {
                cluster.client("sinfo", &["-h", "-N", "-n", &h.ns, "-o", "%T"]).is_ok_and(|o| o.trim() == "idle")
            })?;
        }
        Ok(cluster)
    }

    /// The environment Slurm's clients need.
    pub fn env(&self) -> [(&'static str, &Path); 1] {
        [("SLURM_CONF", self.conf.as_path())]
    }

    /// Runs a Slurm client command as root; its stdout.
    pub fn client(&self, cmd: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(cmd).args(args).envs(self.env()).output().map_err(|e| format!("{cmd}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Job `id`'s state and Slurm's reason for it (`PENDING launch failed
    /// requeued held`), or `None` once Slurm no longer lists it.
    pub fn job(&self, id: &str) -> Option<String> {
        self.client("squeue", &["-h", "-j", id, "-o", "%T %r"])
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Jobs and steps Slurm still lists (`squeue` of jobs, then of steps).
    pub fn queue(&self) -> String {
        let jobs = self.client("squeue", &["-h", "-o", "%i %T %j"]).unwrap_or_else(|e| e);
        let steps = self.client("squeue", &["-h", "-s", "-o", "%i %j"]).unwrap_or_else(|e| e);
        format!("{jobs}{steps}")
    }

    /// Slurm's log files, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.join("log")).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out += &format!("== {}\n", entry.path().display());
            for l in tail.into_iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        // Jobs first (their processes would outlive slurmd), then the
        // daemons by PID, then whatever is left in the hosts' namespaces.
        let ids = self.client("squeue", &["-h", "-o", "%i"]).unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = self.client("scancel", &ids);
        }
        let _ = until(10, "the queue drained", || self.client("squeue", &["-h"]).is_ok_and(|o| o.trim().is_empty()));
        for c in self.daemons.iter_mut().rev() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
        }
        for c in &mut self.daemons {
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in &self.net.hosts {
            let pids = Command::new("ip").args(["netns", "pids", &h.ns]).output().map(|o| o.stdout).unwrap_or_default();
            for pid in String::from_utf8_lossy(&pids).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if let Some(mut m) = self.munged.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
        delete_link(&self.uplink);
        if std::env::var_os("WARDEN_KEEP_SCRATCH").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
