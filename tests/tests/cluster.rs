//! Jobs across hosts: network namespaces on one machine, one per host plus
//! an outsider. Needs root, `ip` and `nft` (CI has them; scripts/test-all
//! installs them). Without them these tests fail, unless
//! `WARDEN_ALLOW_UNPRIVILEGED_TESTS=1` says the run knowingly skips them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warden::launch::{LaunchOptions, launch, prepare};
use warden::transport::Transport;
use warden_tests::netns::NetnsCluster;
use warden_tests::netns_transport::NetnsTransport;
use warden_tests::{bin, fresh_tag, repo_root, scratch};

fn require_cluster_tools() -> bool {
    let have = |c: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = ["ip", "nft"].into_iter().filter(|c| !have(c)).collect();
    let root = warden_agent::host::harden::started_as_root();
    if root && missing.is_empty() {
        return true;
    }
    warden_tests::require(false, &format!("needs root and {missing:?} (root: {root}); scripts/test-all installs them"))
}

fn job_text(epochs: u32) -> String {
    let data = repo_root().join("data/fashion-mnist-small");
    format!(
        r#"
[job]
name = "two-hosts"
seed = 3

[cluster]
user = "warden"
ports = [29500, 29510]

[[cluster.hosts]]
name = "h0"
address = "10.251.0.10"
scheduler = 1
servers = 1
workers = 1

[[cluster.hosts]]
name = "h1"
address = "10.251.0.11"
servers = 1
workers = 1

[model]
kind = "softmax"
inputs = 784
classes = 10

[data]
format = "idx"
train_images = "{d}/train-images-idx3-ubyte.gz"
train_labels = "{d}/train-labels-idx1-ubyte.gz"
test_images = "{d}/t10k-images-idx3-ubyte.gz"
test_labels = "{d}/t10k-labels-idx1-ubyte.gz"

[optimizer]
kind = "sgd"
lr = 0.3

[training]
epochs = {epochs}
batch_size = 64
"#,
        d = data.display()
    )
}

/// A running two-host job: its namespaces, directories, agents' tag and the
/// thread that runs the launcher. Returns once the first epoch is done.
struct ClusterJob {
    net: NetnsCluster,
    dir: warden_tests::Scratch,
    agents_tag: String,
    launcher: std::thread::JoinHandle<Result<warden::launch::Outcome, warden::launch::LaunchError>>,
}

fn start_cluster_job(epochs: u32) -> ClusterJob {
    let net = NetnsCluster::new(&fresh_tag()[..6], 2).expect("network namespaces");
    let dir = scratch("cluster");
    let job = dir.join("job.toml");
    std::fs::write(&job, job_text(epochs)).unwrap();
    let (spec, text, plan) = prepare(&job, false).unwrap();
    let agents_tag = fresh_tag();
    let transport = Arc::new(NetnsTransport {
        agent: bin("warden-agent"),
        nodes_dir: dir.join("nodes"),
        namespaces: BTreeMap::from([
            ("h0".to_string(), net.hosts[0].ns.clone()),
            ("h1".to_string(), net.hosts[1].ns.clone()),
        ]),
        tag: agents_tag.clone(),
    });
    let run = dir.join("run");
    let opts = LaunchOptions {
        run_dir: Some(run.clone()),
        progress: false,
        epoch_lines: false,
        verbose: false,
        started: None,
        resume: None,
        metrics_listen: None,
    };
    let launcher = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(launch(&job, spec, text, plan, move |_| transport as Arc<dyn Transport>, opts))
    });
    let until = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default().lines().count() < 2 {
        assert!(Instant::now() < until, "the job never finished an epoch");
        std::thread::sleep(Duration::from_millis(50));
    }
    ClusterJob { net, dir, agents_tag, launcher }
}

#[test]
fn the_firewall_admits_peers_and_drops_outsiders_then_goes_away() {
    if !require_cluster_tools() {
        return;
    }
    let ClusterJob { net, dir, launcher, .. } = start_cluster_job(40);
    let (h0, h1, out) = (&net.hosts[0], &net.hosts[1], &net.outsider);
    assert!(NetnsCluster::tables(h0).contains("warden_"), "h0 has the job's table");
    // Peers reach the scheduler (h0:29500) and the servers (h0:29501, h1:29500).
    assert!(NetnsCluster::can_connect(h1, h0.addr, 29500), "peer h1 -> scheduler");
    assert!(NetnsCluster::can_connect(h0, h1.addr, 29500), "peer h0 -> server on h1");
    // The outsider reaches none of them.
    for (to, port) in [(h0.addr, 29500), (h0.addr, 29501), (h1.addr, 29500)] {
        assert!(!NetnsCluster::can_connect(out, to, port), "outsider reached {to}:{port}");
    }
    let outcome = launcher.join().unwrap().unwrap();
    assert_eq!(outcome.summary.status, "succeeded", "{:?}", outcome.summary.failure);
    assert!(outcome.summary.test_accuracy.unwrap() > 0.7);
    for h in [h0, h1] {
        assert!(!NetnsCluster::tables(h).contains("warden_"), "{} still has a warden table", h.ns);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_node_killed_mid_job_fails_it_cleanly_and_leaves_no_table() {
    if !require_cluster_tools() {
        return;
    }
    let ClusterJob { net, dir, agents_tag, launcher } = start_cluster_job(100_000);
    let agents = warden_tests::Procs::agents(&agents_tag).pids();
    assert_eq!(agents.len(), 5, "{agents:?}");
    let victim = agents[agents.len() - 1];
    assert!(std::process::Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    let outcome = launcher.join().unwrap().unwrap();
    assert_eq!(outcome.summary.status, "failed");
    warden_tests::wait_gone(&agents_tag);
    for h in &net.hosts {
        assert!(!NetnsCluster::tables(h).contains("warden_"), "{} still has a warden table", h.ns);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn ssh_job(ssh_config: &std::path::Path, remote_dir: &std::path::Path, hosts: &[&str]) -> String {
    let data = repo_root().join("data/fashion-mnist-small");
    format!(
        r#"
[job]
name = "over-ssh"
seed = 5

[cluster]
user = "warden"
ports = [29500, 29510]
ssh_config = "{cfg}"
remote_dir = "{remote}"

[[cluster.hosts]]
name = "h0"
address = "{a0}"
scheduler = 1
servers = 1

[[cluster.hosts]]
name = "h1"
address = "{a1}"
servers = 1
workers = 2

[[cluster.hosts]]
name = "h2"
address = "{a2}"
workers = 2

[model]
kind = "softmax"
inputs = 784
classes = 10

[data]
format = "idx"
train_images = "{d}/train-images-idx3-ubyte.gz"
train_labels = "{d}/train-labels-idx1-ubyte.gz"
test_images = "{d}/t10k-images-idx3-ubyte.gz"
test_labels = "{d}/t10k-labels-idx1-ubyte.gz"

[optimizer]
kind = "sgd"
lr = 0.3

[training]
epochs = 3
batch_size = 32
"#,
        cfg = ssh_config.display(),
        remote = remote_dir.display(),
        a0 = hosts[0],
        a1 = hosts[1],
        a2 = hosts[2],
        d = data.display()
    )
}

/// `job` (from [`ssh_job`]) with its `[[cluster.hosts]]` tables replaced by
/// `cluster`, a line such as `hostfile = "hosts"`.
fn hosts_from_list(job: &str, cluster: &str) -> String {
    let (start, end) = (job.find("[[cluster.hosts]]").unwrap(), job.find("[model]").unwrap());
    let job = format!("{}{}", &job[..start], &job[end..]);
    let at = job.find("remote_dir = ").unwrap();
    let eol = at + job[at..].find('\n').unwrap() + 1;
    format!("{}{cluster}\n{}", &job[..eol], &job[eol..])
}

#[test]
fn a_three_host_job_over_real_ssh_matches_the_local_run() {
    if !require_cluster_tools() {
        return;
    }
    let dir = scratch("ssh");
    let ssh = warden_tests::netns::SshCluster::new(&fresh_tag()[..6], 3, &dir).expect("sshd in namespaces");
    let addrs: Vec<String> = ssh.net.hosts.iter().map(|h| h.addr.to_string()).collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let job = dir.join("job.toml");
    std::fs::write(&job, ssh_job(&ssh.ssh_config, &dir.join("remote"), &addrs)).unwrap();
    let out = std::process::Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--run-dir".as_ref(), dir.join("run").as_os_str()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // Progress per phase: each host as it is ready, then enrolment and start.
    for h in ["h0", "h1", "h2"] {
        assert!(stderr.contains(&format!("  {h}: connected, checked, agent in place (")), "{stderr}");
    }
    for phase in [
        "(3/3, ",
        "firewall table and a uid of the job's own on 3 host(s)",
        "7/7 processes enrolled",
        "7/7 processes started",
    ] {
        assert!(stderr.contains(phase), "no `{phase}`: {stderr}");
    }
    // Each process's output comes back into its log; its INFO lines stay
    // off the terminal.
    let log = std::fs::read_to_string(dir.join("run/logs/h1-worker-0.log")).unwrap();
    assert!(log.contains("running as uid"), "{log}");
    assert!(!stderr.contains("running as uid"), "{stderr}");
    let remote: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/summary.json")).unwrap()).unwrap();
    // The same job on this machine: same seed, ranks and shards, so the same model.
    let local = std::process::Command::new(bin("warden"))
        .args([
            "launch".as_ref(),
            job.as_os_str(),
            "--local".as_ref(),
            "--run-dir".as_ref(),
            dir.join("local").as_os_str(),
        ])
        .output()
        .unwrap();
    assert_eq!(local.status.code(), Some(0), "{}", String::from_utf8_lossy(&local.stderr));
    let local: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("local/summary.json")).unwrap()).unwrap();
    let (a, b) = (remote["test_accuracy"].as_f64().unwrap(), local["test_accuracy"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-9, "over SSH {a}, local {b}");
    assert!(a > 0.7);
    // Every host is clean: no agents, no tables, no job directories.
    for h in &ssh.net.hosts {
        assert!(!NetnsCluster::tables(h).contains("warden_"), "{} kept a table", h.ns);
    }
    let jobs = dir.join("remote/jobs");
    assert!(std::fs::read_dir(&jobs).map_or(true, |mut d| d.next().is_none()), "job directories left in {jobs:?}");
    drop(ssh);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_hosts_fail_fast_with_their_names() {
    if !require_cluster_tools() {
        return;
    }
    let dir = scratch("ssh-bad");
    let ssh = warden_tests::netns::SshCluster::new(&fresh_tag()[..6], 3, &dir).expect("sshd in namespaces");
    let addrs: Vec<String> = ssh.net.hosts.iter().map(|h| h.addr.to_string()).collect();
    let launch_with = |text: String, name: &str| {
        let job = dir.join(format!("{name}.toml"));
        std::fs::write(&job, text).unwrap();
        let started = Instant::now();
        let out = std::process::Command::new(bin("warden"))
            .args(["launch".as_ref(), job.as_os_str(), "--run-dir".as_ref(), dir.join(name).as_os_str()])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), started.elapsed())
    };
    let remote = dir.join("remote");

    // A host that is down (nothing answers at 10.251.0.77).
    let down = ssh_job(&ssh.ssh_config, &remote, &[&addrs[0], &addrs[1], "10.251.0.77"]);
    let (code, err, took) = launch_with(down, "down");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("h2: cannot connect over SSH to `10.251.0.77`"), "{err}");
    assert!(took < Duration::from_secs(45), "took {took:?}");

    // A wrong host key: h1's entry in known_hosts is replaced by another key.
    let known = std::fs::read_to_string(dir.join("known_hosts")).unwrap();
    let other = std::fs::read_to_string(dir.join("id.pub")).unwrap();
    let mut parts = other.split_whitespace();
    let forged: String = known
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{} ", addrs[1])) {
                format!("{} {} {}\n", addrs[1], parts.next().unwrap(), parts.next().unwrap())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(dir.join("known_hosts"), forged).unwrap();
    let (code, err, _) = launch_with(ssh_job(&ssh.ssh_config, &remote, &[&addrs[0], &addrs[1], &addrs[2]]), "hostkey");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("h1: cannot connect over SSH"), "{err}");
    let error = err.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(!error.contains("h0:") && !error.contains("h2:"), "only h1 is named: {err}");
    std::fs::write(dir.join("known_hosts"), known).unwrap();

    // A job user that does not exist on the hosts.
    let nouser = ssh_job(&ssh.ssh_config, &remote, &[&addrs[0], &addrs[1], &addrs[2]])
        .replace("user = \"warden\"", "user = \"no-such-user\"");
    let (code, err, _) = launch_with(nouser, "nouser");
    assert_eq!(code, Some(1), "{err}");
    // Caught by the host checks before anything is deployed, for every host.
    assert!(err.contains("h0: job user: does not exist: create it (playbooks/node-prep.yml does)"), "{err}");
    let doctor = std::process::Command::new(bin("warden")).arg("doctor").arg(dir.join("nouser.toml")).output().unwrap();
    assert_eq!(doctor.status.code(), Some(1));
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(report.lines().any(|l| l.starts_with("h1") && l.contains("job user") && l.contains("FAIL")), "{report}");
    assert!(report.lines().any(|l| l.starts_with("h1") && l.contains("nft") && l.contains(" ok ")), "{report}");
    // A port of the job's range taken on h1 (its server's, the first of the
    // range) by another program: named by the host checks, nothing deployed.
    let mut squatter = std::process::Command::new("ip")
        .args(["netns", "exec", &ssh.net.hosts[1].ns, "python3", "-c"])
        .arg(format!(
            "import socket, time\ns = socket.socket()\ns.bind(('{}', 29500))\ns.listen()\nprint('ok', flush=True)\ntime.sleep(120)",
            addrs[1]
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(squatter.stdout.as_mut().unwrap()), &mut ready).unwrap();
    assert_eq!(ready.trim(), "ok", "the squatter did not bind");
    let (code, err, _) = launch_with(ssh_job(&ssh.ssh_config, &remote, &[&addrs[0], &addrs[1], &addrs[2]]), "busy");
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("h1: ports: in use: 29500"), "{err}");
    assert!(!err.contains("h0: ports") && !err.contains("h2: ports"), "{err}");

    let healthy = dir.join("healthy.toml");
    std::fs::write(&healthy, ssh_job(&ssh.ssh_config, &remote, &[&addrs[0], &addrs[1], &addrs[2]])).unwrap();
    let doctor = std::process::Command::new(bin("warden")).arg("doctor").arg(&healthy).output().unwrap();
    assert_eq!(doctor.status.code(), Some(0), "{}", String::from_utf8_lossy(&doctor.stdout));
    for h in &ssh.net.hosts {
        assert!(!NetnsCluster::tables(h).contains("warden_"), "{} kept a table", h.ns);
    }
    drop(ssh);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A long job over SSH on three sshd hosts, launched as a child process
/// (with `WARDEN_TEST_TAG=tag`); returns once its first epoch is done.
/// Waits up to `secs` until no process runs an agent binary from
/// `remote_bin` (agents started through sshd are not our children).
fn wait_no_agents_under(remote_bin: &std::path::Path, secs: u64, what: &str) {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let alive = agents_under(remote_bin);
        if alive.is_empty() {
            return;
        }
        assert!(Instant::now() < until, "agents still running {what}: {alive:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The processes that run an agent binary from `remote_bin`.
fn agents_under(remote_bin: &std::path::Path) -> Vec<u32> {
    warden_tests::Procs::all().exe_under(remote_bin).pids()
}

/// A job of [`ssh_job`] over 3 namespace hosts that runs until stopped,
/// started and past its first epoch; `training` is appended to `[training]`, and the
/// hosts (same roles) from an MPI-style hostfile when `hostfile`.
fn start_long_ssh_job_with(
    name: &str,
    tag: &str,
    training: &str,
    hostfile: bool,
) -> (warden_tests::Scratch, warden_tests::netns::SshCluster, std::path::PathBuf, warden_tests::Launcher) {
    let dir = scratch(name);
    let ssh = warden_tests::netns::SshCluster::new(&fresh_tag()[..6], 3, &dir).expect("sshd in namespaces");
    let addrs: Vec<String> = ssh.net.hosts.iter().map(|h| h.addr.to_string()).collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let job = dir.join("job.toml");
    let mut text = ssh_job(&ssh.ssh_config, &dir.join("remote"), &addrs)
        .replace("epochs = 3", "epochs = 100000")
        .replace("[training]\n", &format!("[training]\n{training}\n"));
    if hostfile {
        text = hosts_from_list(&text, "hostfile = \"hosts\"\nservers_per_host = 0");
        let lines = format!(
            "# the same roles as ssh_job's tables\n{} scheduler=1 servers=1 slots=0\n{} servers=1 slots=2\n{} slots=2\n",
            addrs[0], addrs[1], addrs[2]
        );
        std::fs::write(dir.join("hosts"), lines).unwrap();
    }
    std::fs::write(&job, text).unwrap();
    let run = dir.join("run");
    let launcher = std::process::Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--run-dir".as_ref(), run.as_os_str()])
        .env("WARDEN_TEST_TAG", tag)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let launcher = warden_tests::Launcher::drained(launcher);
    let until = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default().lines().count() < 2 {
        assert!(Instant::now() < until, "the job never finished an epoch");
        std::thread::sleep(Duration::from_millis(50));
    }
    (dir, ssh, run, launcher)
}

#[test]
fn ctrl_c_over_ssh_leaves_every_host_clean() {
    if !require_cluster_tools() {
        return;
    }
    // Hosts from a hostfile here: the SSH path is the same either way.
    let (dir, ssh, run, launcher) = start_long_ssh_job_with("ssh-int", &fresh_tag(), "", true);
    // The agents ran through sshd, not as our children: find them by their binary under remote_dir.
    let remote_bin = dir.join("remote/bin");
    // One agent is frozen: it cannot obey the stop, so the launcher ends
    // its process group on its host (SIGTERM, grace, SIGKILL).
    let frozen = agents_under(&remote_bin)[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(frozen as i32), nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Worker 0 cannot save the model while a peer is frozen: the stop
    // goes on without it once the frozen agent is declared dead (or the
    // grace for saving ends), and still exits as a stop.
    assert!(std::process::Command::new("kill").args(["-INT", &launcher.id().to_string()]).status().unwrap().success());
    let out = launcher.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    wait_no_agents_under(&remote_bin, 15, "after Ctrl-C");
    let logs: String = std::fs::read_dir(run.join("logs"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    assert!(
        logs.contains("did not stop on request: process group") && logs.contains("killed with SIGKILL"),
        "no log says how the frozen agent was ended"
    );
    for h in &ssh.net.hosts {
        assert!(!NetnsCluster::tables(h).contains("warden_"), "{} kept a table", h.ns);
    }
    let jobs = dir.join("remote/jobs");
    assert!(std::fs::read_dir(&jobs).map_or(true, |mut d| d.next().is_none()), "job directories left in {jobs:?}");
    drop(ssh);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `cargo test --release -p warden-tests --test cluster launch_time -- --ignored --nocapture`:
/// seconds from `warden launch` to every process running, over SSH to 2, 4
/// and 8 namespace hosts, with the agent uploaded (first) and cached (repeat).
#[test]
#[ignore = "benchmark; run explicitly (see docs/benchmarks.md)"]
fn launch_time() {
    if !require_cluster_tools() {
        return;
    }
    for n in [2usize, 4, 8] {
        let dir = scratch("launch-bench");
        let ssh = warden_tests::netns::SshCluster::new(&fresh_tag()[..6], n, &dir).expect("sshd in namespaces");
        let mut text = format!(
            "[job]\nname = \"launch-bench\"\nseed = 1\n\n[cluster]\nuser = \"warden\"\nports = [29500, 29510]\n\
             ssh_config = \"{}\"\nremote_dir = \"{}\"\n",
            ssh.ssh_config.display(),
            dir.join("remote").display()
        );
        for (i, h) in ssh.net.hosts.iter().enumerate() {
            let roles = if i == 0 { "scheduler = 1\nservers = 1\nworkers = 1" } else { "workers = 1" };
            text += &format!("\n[[cluster.hosts]]\nname = \"h{i}\"\naddress = \"{}\"\n{roles}\n", h.addr);
        }
        text += "\n[model]\nkind = \"synthetic\"\nparams = 1000\n\n[optimizer]\nkind = \"sgd\"\nlr = 0.001\n\n\
                 [training]\nepochs = 1\nbatch_size = 1\nsteps = 1\n";
        let job = dir.join("job.toml");
        std::fs::write(&job, text).unwrap();
        let mut figures = Vec::new();
        for attempt in ["first", "cached"] {
            let run = dir.join(format!("run-{attempt}"));
            let out = std::process::Command::new(bin("warden"))
                .args(["launch".as_ref(), job.as_os_str(), "--run-dir".as_ref(), run.as_os_str()])
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
            let s: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
            figures.push(s["startup_s"].as_f64().unwrap());
            for line in String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains("connected over SSH")) {
                println!("  {attempt}: {line}");
            }
        }
        println!("warden launch: hosts={n} first_s={:.2} cached_s={:.2}", figures[0], figures[1]);
        drop(ssh);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_host_whose_link_is_cut_fails_the_job_and_the_others_are_left_clean() {
    if !require_cluster_tools() {
        return;
    }
    // Heartbeats notice the silence long before SSH's own keep-alives would.
    let (dir, ssh, run, launcher) = start_long_ssh_job_with("ssh-cut", &fresh_tag(), "heartbeat_timeout = 4", false);
    // Cut h2 (two workers) off the network.
    let cut = Instant::now();
    assert!(
        std::process::Command::new("ip")
            .args(["-n", &ssh.net.hosts[2].ns, "link", "set", "eth0", "down"])
            .status()
            .unwrap()
            .success()
    );
    let out = launcher.wait_with_output().unwrap();
    let took = cut.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The heartbeat timeout notices the cut (4 s); the launcher then waits for
    // the unreachable host's SSH channel to end (ServerAliveInterval 5 s x 3)
    // before it tears down the others: about 20 s here.
    assert!(took < Duration::from_secs(4 + 30), "the launcher took {took:?} to give up");
    let summary = std::fs::read_to_string(run.join("summary.json")).unwrap();
    assert!(summary.contains("\"status\": \"failed\""), "{summary}");
    // Who is named first is a race here: the scheduler declaring the cut
    // workers dead, or a peer of theirs whose connection the cut broke.
    for h in &ssh.net.hosts[..2] {
        assert!(!NetnsCluster::tables(h).contains("warden_"), "{} kept a table", h.ns);
    }
    eprintln!("cut link detected and the job torn down in {took:?}");
    // The cut host's agents cannot hear the launcher; their sshd notices the
    // dead client (ClientAliveInterval, as playbooks/node-prep.yml sets it)
    // and ends their sessions, so they stop too: no orphans.
    let remote_bin = dir.join("remote/bin");
    wait_no_agents_under(&remote_bin, 30, "on the cut host");
    drop(ssh);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `playbooks/node-prep.yml` prepares the namespace hosts over
/// real SSH (Ansible through the same ssh_config the launcher uses), and a
/// warden job then runs on them from the prepared `remote_dir`. The hosts
/// share this machine's filesystem, so the sshd drop-in is left out here
/// (it would change this machine's sshd); `tests/tests/playbooks.rs` covers
/// the rest of both playbooks.
#[test]
fn node_prep_over_ssh_prepares_the_hosts_a_job_then_runs_on() {
    if !require_cluster_tools() {
        return;
    }
    let Ok(ansible) = std::env::var("WARDEN_ANSIBLE") else {
        panic!("WARDEN_ANSIBLE must name a bin directory with ansible-playbook; ./scripts/test-all makes it")
    };
    let dir = scratch("ssh-prep");
    let ssh = warden_tests::netns::SshCluster::new(&fresh_tag()[..6], 3, &dir).expect("sshd in namespaces");
    let remote = dir.join("remote");
    let mut inv = String::from("[warden_nodes]\n");
    for (i, h) in ssh.net.hosts.iter().enumerate() {
        inv.push_str(&format!("h{i} ansible_host={}\n", h.addr));
    }
    inv.push_str(&format!(
        "\n[warden_nodes:vars]\nansible_user=root\nansible_python_interpreter=/usr/bin/python3\n\
         ansible_ssh_common_args='-F {}'\n",
        ssh.ssh_config.display()
    ));
    std::fs::write(dir.join("inventory.ini"), inv).unwrap();
    let play = || {
        let out = std::process::Command::new(std::path::Path::new(&ansible).join("ansible-playbook"))
            .args(["-i".as_ref(), dir.join("inventory.ini").as_os_str()])
            // The three hosts are namespaces of one machine and share its apt
            // lock and lists: updating them from three hosts at once would
            // fail on the lock (it does under load), so one host at a time.
            .args(["--forks", "1"])
            .arg(repo_root().join("playbooks/node-prep.yml"))
            .args(["-e", &format!("warden_remote_dir={}", remote.display())])
            .args(["-e", &format!("warden_checkpoint_dir={}", remote.join("checkpoints").display())])
            .args(["-e", &format!("warden_agent_binary={}", bin("warden-agent").display())])
            .args(["-e", "warden_harden_sshd=false"])
            .env("ANSIBLE_HOST_KEY_CHECKING", "True")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "node-prep over SSH failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let first = play();
    assert_eq!(first.matches("unreachable=0    failed=0").count(), 3, "{first}");
    let second = play();
    assert_eq!(second.matches(" changed=0 ").count(), 3, "a second run changed something:\n{second}");
    assert!(remote.join("bin/warden-agent").is_file());

    let addrs: Vec<String> = ssh.net.hosts.iter().map(|h| h.addr.to_string()).collect();
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    // The job takes its hosts from the playbook's own inventory (roles by
    // default: the scheduler on h0, a server and a worker on each host).
    let job = dir.join("job.toml");
    let text = hosts_from_list(
        &ssh_job(&ssh.ssh_config, &remote, &addrs),
        "inventory = \"inventory.ini\"\ninventory_group = \"warden_nodes\"",
    );
    std::fs::write(&job, text).unwrap();
    let out = std::process::Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--run-dir".as_ref(), dir.join("run").as_os_str()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/plan.json")).unwrap()).unwrap();
    let names: Vec<&str> = plan["hosts"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["h0", "h1", "h2"], "the hosts are the inventory's");
    drop(ssh);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The launcher killed outright (no teardown): every agent sees its SSH
/// channel close and stops within seconds, and the dead launcher's SSH
/// masters exit on their own soon after (ControlPersist with an idle limit).
#[test]
fn agents_over_ssh_stop_when_the_launcher_is_killed() {
    if !require_cluster_tools() {
        return;
    }
    let (dir, ssh, _run, mut launcher) = start_long_ssh_job_with("ssh-kill", &fresh_tag(), "", false);
    // The launcher's SSH control directory: warden-ssh-PID-RANDOM, mode 0700.
    let prefix = format!("warden-ssh-{}-", launcher.id());
    let control = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
        .map(|e| e.path())
        .unwrap_or_else(|| panic!("no {prefix}* directory: where are the launcher's control sockets?"));
    assert_eq!(std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&control).unwrap()) & 0o777, 0o700);
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let remote_bin = dir.join("remote/bin");
    wait_no_agents_under(&remote_bin, 15, "after the launcher was killed");
    // Masters are found by the control directory on their command line;
    // each exits 15 s after its last channel closed.
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let masters = warden_tests::Procs::all().cmdline_contains(control.to_str().unwrap()).pids();
        if masters.is_empty() {
            break;
        }
        assert!(Instant::now() < until, "SSH masters of the dead launcher still run: {masters:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The dead launcher could not remove its control directory; the next
    // launcher of this user sweeps it (unit-tested in launcher/src/ssh.rs).
    let _ = std::fs::remove_dir_all(&control);
    drop(ssh);
    std::fs::remove_dir_all(&dir).unwrap();
}
