//! Jobs on a real Slurm cluster of network-namespace nodes
//! ([`warden_tests::slurm::SlurmCluster`]), submitted by an unprivileged
//! user as on a lab's cluster.
//!
//! These tests need root to build the cluster (CI runs as root) and
//! Debian's Slurm and munge packages (`./scripts/test-all` installs them).
//! Without them they fail, unless `WARDEN_ALLOW_UNPRIVILEGED_TESTS=1` says
//! the run knowingly skips them.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use warden_tests::slurm::SlurmCluster;
use warden_tests::{bin, fresh_tag, job_in, repo_root, require_root, scratch, spawn_launch, wait_for};

/// The account the tests submit as: a lab user, not root.
const USER: &str = "wardenslurm";

fn test_user() -> nix::unistd::User {
    if let Some(u) = nix::unistd::User::from_name(USER).unwrap() {
        return u;
    }
    let made = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", USER])
        .output()
        .unwrap();
    assert!(made.status.success(), "useradd: {}", String::from_utf8_lossy(&made.stderr));
    nix::unistd::User::from_name(USER).unwrap().unwrap()
}

/// The binaries and the data copied into `dir/u`, owned by the test user
/// (the checkout may sit where nobody else can enter, a clone in /root);
/// `configs/local.toml` there with `hosts` in place of its host table;
/// the job file's path.
fn stage(dir: &Path, user: &nix::unistd::User, ports: (u16, u16), hosts: &str, epochs: u32) -> PathBuf {
    let u = dir.join("u");
    std::fs::create_dir_all(u.join("bin")).unwrap();
    for name in ["warden", "warden-agent"] {
        std::fs::copy(bin(name), u.join("bin").join(name)).unwrap();
    }
    let data = repo_root().join("data/fashion-mnist-small");
    std::fs::create_dir_all(u.join("data")).unwrap();
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), u.join("data").join(entry.file_name())).unwrap();
    }
    let table =
        "[[cluster.hosts]]\nname = \"localhost\"\naddress = \"127.0.0.1\"\nscheduler = 1\nservers = 2\nworkers = 2";
    let job = job_in(&u, ports, &[(table, hosts), ("epochs = 5", &format!("epochs = {epochs}"))]);
    let text = std::fs::read_to_string(&job).unwrap().replace(data.to_str().unwrap(), u.join("data").to_str().unwrap());
    std::fs::write(&job, text).unwrap();
    let chown = format!("{}:{}", user.uid, user.gid);
    assert!(Command::new("chown").args(["-R", &chown, u.to_str().unwrap()]).status().unwrap().success());
    job
}

/// The tag of the test whose scratch directory is `dir`.
fn tag_of(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().rsplit('-').next().unwrap().to_string()
}

/// `warden ARGS` as the test user, with Slurm's configuration (and the
/// test's tag, which sbatch and srun pass on to the launcher and agents).
fn warden_as(user: &nix::unistd::User, dir: &Path, cluster: &SlurmCluster, args: &[&str]) -> std::process::Output {
    run_as(user, dir, cluster, &dir.join("u/bin/warden"), args)
}

/// `program ARGS` as the test user in `dir/u`, with a clean environment:
/// PATH, Slurm's configuration and the test's tag.
fn run_as(
    user: &nix::unistd::User,
    dir: &Path,
    cluster: &SlurmCluster,
    program: &Path,
    args: &[&str],
) -> std::process::Output {
    Command::new(program)
        .args(args)
        .current_dir(dir.join("u"))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("WARDEN_TEST_TAG", tag_of(dir))
        .envs(cluster.env())
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .output()
        .unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Waits (`secs`) for `path` to appear while Slurm job `id` runs; on
/// timeout, or once Slurm holds the job, panics with what the run and
/// Slurm say.
fn wait_for_file(path: &Path, secs: u64, run: &Path, cluster: &SlurmCluster, id: &str) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !path.exists() {
        let held = cluster.job(id).is_some_and(|s| s.contains("held") || s.contains("failed"));
        if held || Instant::now() > end {
            let log = std::fs::read_to_string(run.join("launcher.log")).unwrap_or_default();
            panic!(
                "no {} (after at most {secs}s)\nlauncher.log:\n{log}\nqueue:\n{}\nslurm logs:\n{}",
                path.display(),
                cluster.queue(),
                cluster.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Submits `job` into `run` as the test user; the Slurm job id.
fn submit(user: &nix::unistd::User, dir: &Path, cluster: &SlurmCluster, job: &Path, run: &Path) -> String {
    let out = warden_as(user, dir, cluster, &["launch", job.to_str().unwrap(), "--run-dir", run.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let id = err.split_whitespace().skip_while(|w| *w != "job").nth(1).unwrap_or_else(|| panic!("no job id: {err}"));
    assert!(id.bytes().all(|b| b.is_ascii_digit()), "{err}");
    id.to_string()
}

/// Waits until no process of `uid` is left on the machine (every node).
fn wait_no_processes_of(uid: u32) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let left = warden_tests::Procs::all().uid(uid).pids();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "processes of uid {uid} are left: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for Slurm to list no job and no step.
fn wait_queue_empty(cluster: &SlurmCluster) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let q = cluster.queue();
        if q.trim().is_empty() {
            return;
        }
        assert!(Instant::now() < end, "Slurm still lists:\n{q}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A lab user submits the shipped job with `[cluster.slurm] nodes = 2`
/// from outside an allocation: `warden launch` returns at once with the
/// Slurm job id, the launcher runs inside the allocation with the
/// submitting shell long gone, every process is a step on the node the
/// planner put it on, and training reaches exactly the accuracy of the same
/// job on one machine; then nothing of it is left in Slurm's queue and
/// `warden status` says how the Slurm job ended.
#[test]
fn a_job_submitted_with_sbatch_trains_on_two_nodes_as_on_one_machine() {
    if !require_root() {
        return;
    }
    let tag = fresh_tag();
    let dir = scratch("slurm-train");
    let cluster = SlurmCluster::start(&tag[..6], 2).unwrap();
    let user = test_user();
    let slurm_hosts = "backend = \"slurm\"\n[cluster.slurm]\nnodes = 2\nservers_per_node = 1\nworkers_per_node = 1";
    let job = stage(&dir, &user, (32290, 32299), slurm_hosts, 2);

    let plan = warden_as(&user, &dir, &cluster, &["plan", job.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.status.success(), "{said}{}", String::from_utf8_lossy(&plan.stderr));
    assert!(said.contains("node-1") && said.contains("node-2"), "the plan shows stand-ins before sbatch: {said}");
    assert!(said.contains("the job gets no uid of its own"), "the plan names what is missing: {said}");

    let run = dir.join("u/run");
    let id = submit(&user, &dir, &cluster, &job, &run);
    let shown = cluster.client("scontrol", &["-o", "show", "job", &id]).unwrap();
    assert!(shown.contains(&format!("UserId={USER}(")), "Slurm has the job as the user's: {shown}");

    wait_for_file(&run.join("summary.json"), 300, &run, &cluster, &id);
    let summary = json(&run.join("summary.json"));
    let log = std::fs::read_to_string(run.join("launcher.log")).unwrap_or_default();
    assert_eq!(summary["status"], "succeeded", "{summary}\n{log}");
    assert!(log.contains(&format!("inside Slurm job {id}")), "{log}");
    assert!(log.contains("no firewall table and no uid of its own"), "without the prolog, the launch says so: {log}");
    let plan = json(&run.join("plan.json"));
    let hosts: Vec<&str> = plan["hosts"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
    let nodes: Vec<&str> = cluster.net.hosts.iter().map(|h| h.ns.as_str()).collect();
    assert_eq!(hosts, nodes, "the allocation's nodes are the job's hosts");

    // The same job on one machine (two servers, two workers) reaches the
    // very same accuracy: placement changes nothing of the arithmetic.
    let local_dir = scratch("slurm-reference");
    let reference = job_in(&local_dir, (32300, 32309), &[("epochs = 5", "epochs = 2")]);
    let local_run = local_dir.join("run");
    let (status, stderr) = wait_for(spawn_launch(&tag, &reference, &local_run), &local_run, 180);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let local = json(&local_run.join("summary.json"));
    assert_eq!(summary["test_accuracy"], local["test_accuracy"], "slurm {summary}\nlocal {local}");

    wait_queue_empty(&cluster);
    let status = warden_as(&user, &dir, &cluster, &["status", run.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(said.contains(&format!("slurm job {id}")) && said.contains("succeeded"), "{said}");
}

/// With warden's prolog and epilog installed: while a submitted job
/// trains, every node has the job's table (a host outside the allocation
/// cannot reach the scheduler's port, a node of it can) and the launch says
/// where the firewall came from. `warden stop` makes the launcher inside the
/// allocation save the model and end every step; a worker killed on its
/// node fails the next job, named. Either way Slurm lists no job and no
/// step after, no process of the user is left on any node, and no table.
#[test]
fn warden_stop_and_a_killed_worker_leave_no_step_no_process_and_no_table() {
    if !require_root() {
        return;
    }
    let tag = fresh_tag();
    let dir = scratch("slurm-stop");
    let user = test_user();
    let slurm_hosts = "[cluster.slurm]\nnodes = 2\nservers_per_node = 1\nworkers_per_node = 1";
    let job = stage(&dir, &user, (32310, 32319), slurm_hosts, 3000);
    let agent = dir.join("u/bin/warden-agent");
    let cluster = SlurmCluster::with_prolog(&tag[..6], 2, &agent, (32300, 32399)).unwrap();
    let tables_gone = |id: &str| {
        let end = Instant::now() + Duration::from_secs(30);
        for h in &cluster.net.hosts {
            while warden_tests::netns::NetnsCluster::tables(h).contains(&format!("warden_slurm_{id}")) {
                assert!(Instant::now() < end, "the epilog left the table on {}", h.ns);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let note = Path::new(warden_agent::host::slurm::NOTES).join(id);
        while note.exists() {
            assert!(Instant::now() < end, "the epilog left {}", note.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let first_epoch = |run: &Path, id: &str| {
        let end = Instant::now() + Duration::from_secs(120);
        while std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default().lines().count() < 2 {
            let held = cluster.job(id).is_some_and(|s| s.contains("held") || s.contains("failed"));
            assert!(!held && Instant::now() < end, "no epoch finished: {}\n{}", cluster.queue(), cluster.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let run = dir.join("u/run");
    let id = submit(&user, &dir, &cluster, &job, &run);
    first_epoch(&run, &id);
    for h in &cluster.net.hosts {
        let tables = warden_tests::netns::NetnsCluster::tables(h);
        assert!(tables.contains(&format!("warden_slurm_{id}")), "no table on {}: {tables}", h.ns);
    }
    let plan = json(&run.join("plan.json"));
    let scheduler = plan["processes"].as_array().unwrap().iter().find(|p| p["role"] == "scheduler").unwrap();
    let port = scheduler["port"].as_u64().unwrap() as u16;
    let at: std::net::Ipv4Addr = scheduler["address"].as_str().unwrap().parse().unwrap();
    use warden_tests::netns::NetnsCluster;
    assert!(!NetnsCluster::can_connect(&cluster.net.outsider, at, port), "an outsider reached the scheduler");
    assert!(NetnsCluster::can_connect(&cluster.net.hosts[1], at, port), "a node of the job cannot reach the scheduler");
    let log = std::fs::read_to_string(run.join("launcher.log")).unwrap_or_default();
    assert!(log.contains(&format!("firewall from the Slurm prolog: warden_slurm_{id} ports 32310-32319")), "{log}");
    let stopped = warden_as(&user, &dir, &cluster, &["stop", run.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&stopped.stdout);
    assert!(stopped.status.success(), "{said}{}", String::from_utf8_lossy(&stopped.stderr));
    assert!(said.contains("stopped: model saved"), "{said}");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "stopped", "{summary}");
    assert!(run.join("model/model.safetensors").is_file());
    wait_queue_empty(&cluster);
    wait_no_processes_of(user.uid.as_raw());
    tables_gone(&id);

    let run = dir.join("u/run2");
    let id = submit(&user, &dir, &cluster, &job, &run);
    first_epoch(&run, &id);
    let victim = warden_tests::Procs::agents(&tag_of(&dir)).comm("wd-worker-1").first().expect("worker 1 runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for_file(&run.join("summary.json"), 120, &run, &cluster, &id);
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "failed", "{summary}");
    assert!(summary["failure"].as_str().unwrap_or_default().contains("worker[1]"), "{summary}");
    wait_queue_empty(&cluster);
    wait_no_processes_of(user.uid.as_raw());
    tables_gone(&id);
}

/// Submitted as root, the agents on the nodes drop to a uid of the job's
/// own and each node gets the job's per-process table, as over SSH: the
/// launch warns of nothing missing, and the job trains.
#[test]
fn submitted_as_root_the_job_gets_its_own_uid_and_tables() {
    if !require_root() {
        return;
    }
    let tag = fresh_tag();
    let dir = scratch("slurm-root");
    let cluster = SlurmCluster::start(&tag[..6], 2).unwrap();
    let slurm_hosts = "[cluster.slurm]\nnodes = 2\nservers_per_node = 1\nworkers_per_node = 1";
    let table =
        "[[cluster.hosts]]\nname = \"localhost\"\naddress = \"127.0.0.1\"\nscheduler = 1\nservers = 2\nworkers = 2";
    let job = job_in(&dir, (32320, 32329), &[(table, slurm_hosts), ("epochs = 5", "epochs = 1")]);
    let run = dir.join("run");
    let out = Command::new(bin("warden"))
        .args(["launch", job.to_str().unwrap(), "--run-dir", run.to_str().unwrap()])
        .env("WARDEN_TEST_TAG", &tag)
        .envs(cluster.env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let id = err.split_whitespace().skip_while(|w| *w != "job").nth(1).unwrap().to_string();
    wait_for_file(&run.join("summary.json"), 300, &run, &cluster, &id);
    let summary = json(&run.join("summary.json"));
    let log = std::fs::read_to_string(run.join("launcher.log")).unwrap_or_default();
    assert_eq!(summary["status"], "succeeded", "{summary}\n{log}");
    assert!(!log.contains("not running as root"), "{log}");
    assert!(log.contains("firewall table and a uid of the job's own on 2 host(s)"), "{log}");
    let logs = std::fs::read_to_string(run.join(format!("logs/{}-worker-1.log", cluster.net.hosts[1].ns))).unwrap();
    let uid: u32 = logs
        .split("running as uid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no uid in the worker's log: {logs}"));
    assert!(uid >= 2_000_000_000, "the worker runs under a leased job uid, not {uid}");
    wait_queue_empty(&cluster);
    for h in &cluster.net.hosts {
        let tables = warden_tests::netns::NetnsCluster::tables(h);
        assert!(!tables.contains("warden_"), "a table is left on {}: {tables}", h.ns);
    }
}

/// A job whose allocation is about to reach its time limit is stopped in
/// order by its launcher (Slurm's SIGUSR1 ahead of the limit, as warden
/// submits it), says why, and leaves nothing in the queue.
#[test]
fn the_launcher_stops_in_order_ahead_of_slurms_time_limit() {
    if !require_root() {
        return;
    }
    let tag = fresh_tag();
    let dir = scratch("slurm-limit");
    let user = test_user();
    let slurm_hosts = "[cluster.slurm]\nnodes = 2\ntime = \"1\"";
    let job = stage(&dir, &user, (32330, 32339), slurm_hosts, 3000);
    let cluster = SlurmCluster::start(&tag[..6], 2).unwrap();
    let run = dir.join("u/run");
    let id = submit(&user, &dir, &cluster, &job, &run);
    let limit = cluster.client("squeue", &["-h", "-j", &id, "-o", "%l"]).unwrap();
    assert_eq!(limit.trim(), "1:00", "the job file's time limit reached sbatch");
    wait_for_file(&run.join("summary.json"), 150, &run, &cluster, &id);
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "stopped", "{summary}");
    assert!(summary["stopped"].as_str().unwrap_or_default().contains("Slurm's time limit"), "{summary}");
    wait_queue_empty(&cluster);
    wait_no_processes_of(user.uid.as_raw());
}

/// The user's own batch script calling `warden launch` inside its
/// allocation: the launcher uses it directly (no second submission), and
/// `warden stop` reaches that launcher through Slurm.
#[test]
fn a_batch_script_of_the_users_own_runs_the_job_inside_its_allocation() {
    if !require_root() {
        return;
    }
    let tag = fresh_tag();
    let dir = scratch("slurm-own");
    let user = test_user();
    let slurm_hosts = "[cluster.slurm]\nnodes = 2";
    let job = stage(&dir, &user, (32350, 32359), slurm_hosts, 3000);
    let cluster = SlurmCluster::start(&tag[..6], 2).unwrap();
    let run = dir.join("u/run");
    let script = dir.join("u/job.sh");
    let warden = dir.join("u/bin/warden");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nexec {} launch {} --run-dir {}\n", warden.display(), job.display(), run.display()),
    )
    .unwrap();
    assert!(
        Command::new("chown").args([&format!("{}", user.uid), script.to_str().unwrap()]).status().unwrap().success()
    );
    let log = dir.join("u/out.log");
    let args = ["--parsable", "-N2", "--output", log.to_str().unwrap(), script.to_str().unwrap()];
    let out = run_as(&user, &dir, &cluster, Path::new("sbatch"), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let end = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default().lines().count() < 2 {
        let log = std::fs::read_to_string(dir.join("u/out.log")).unwrap_or_default();
        assert!(Instant::now() < end, "no epoch: {log}\n{}\n{}", cluster.queue(), cluster.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!run.join("slurm.json").exists(), "inside an allocation nothing is submitted again");
    assert_eq!(json(&run.join("run.json"))["slurm_job"], id.as_str());
    let stopped = warden_as(&user, &dir, &cluster, &["stop", run.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&stopped.stdout);
    assert!(stopped.status.success() && said.contains("stopped: model saved"), "{said}");
    assert_eq!(json(&run.join("summary.json"))["status"], "stopped");
    wait_queue_empty(&cluster);
    wait_no_processes_of(user.uid.as_raw());
}
