//! A job cannot hurt the host it runs on or another job there: each test
//! below performs an attack, as a hostile user program, as the job's uid or
//! as another local user, against a real local job launched as root.
//!
//! The programs are plain `/usr/bin/python3` scripts (`[model] kind =
//! "external"`, see `docs/byo.md`) that never train: they probe, write what
//! they found into a directory the test shares with them, and exit.
//! These tests need root (CI has it): without it they fail, saying so.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use warden_tests::procs::alive;
use warden_tests::{JobFile, Procs, Raw, bin, fresh_tag, scratch, spawn_launch, wait_for, wait_gone};

fn need_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the isolation tests launch jobs as root (per-job uids, firewall, privilege drop); run them as root (CI does)"
    );
}

/// A job of one scheduler, server and worker named `name` on `ports` whose
/// worker runs `script` with `env` (a TOML inline table's body).
fn program_job(dir: &Path, name: &str, ports: (u16, u16), script: &str, env: &str) -> PathBuf {
    let script_path = dir.join(format!("{name}.py"));
    std::fs::write(&script_path, script).unwrap();
    JobFile::tiny()
        .without("data")
        .without("limits")
        .without("model")
        .set("job", "name", name)
        .set("cluster.hosts", "name", "localhost")
        .ports(ports.0, ports.1)
        .set("model", "kind", "external")
        .set("model.tensors", "x", [6])
        .set("worker", "command", [Path::new("/usr/bin/python3"), &script_path])
        .set("worker", "env", Raw(format!("{{ {env} }}")))
        .write(dir.join(format!("{name}.toml")))
}

/// A directory every uid may write, as /tmp is (sticky).
fn exchange(dir: &Path) -> PathBuf {
    let x = dir.join("x");
    std::fs::create_dir(&x).unwrap();
    std::fs::set_permissions(&x, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // The scratch directory itself must be passable for the job's uid.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    x
}

fn wait_file(path: &Path, secs: u64) -> String {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        assert!(Instant::now() < until, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Writes `value` as JSON to `X/NAME` atomically, then (optionally) waits
/// for `X/WAIT`; shared by the scripts below.
/// Writes `X/name` for a program to read, whole at once (written aside,
/// then renamed): a program polling for the name never reads it half made.
fn put(x: &Path, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = x.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, x.join(name)).unwrap();
}

const PRELUDE: &str = r#"
import json, os, socket, sys, time
X = os.environ["X"]
def put(name, value):
    tmp = os.path.join(X, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
    # Programs start with umask 077: shared on purpose.
    os.chmod(tmp, 0o644)
    os.rename(tmp, os.path.join(X, name))
def wait(name, secs=120):
    until = time.time() + secs
    while not os.path.exists(os.path.join(X, name)):
        if time.time() > until:
            sys.exit("waited in vain for " + name)
        time.sleep(0.02)
    with open(os.path.join(X, name)) as f:
        return json.load(f)
"#;

/// Two jobs at once on one host: each program learns the other's uid, PID,
/// KV socket and job directory, and tries them all. (Checkpoint series are
/// each job's uid's, in a root-owned root: see the link test below.)
#[test]
fn two_jobs_at_once_cannot_reach_each_others_sockets_processes_or_files() {
    need_root();
    let dir = scratch("iso-two");
    let x = exchange(&dir);
    let script = format!(
        "{PRELUDE}{}",
        r#"
import ctypes
me, other = os.environ["ME"], os.environ["OTHER"]
put(me + ".json", {"uid": os.getuid(), "pid": os.getpid(), "kv": os.environ["WARDEN_KV"], "dir": os.environ["WARDEN_RUN_DIR"]})
o = wait(other + ".json")
found = {"uid": os.getuid(), "other_uid": o["uid"]}
def attempt(what, f):
    try:
        f()
        found[what] = "done"
    except OSError as e:
        found[what] = e.strerror
def connect():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(o["kv"])
attempt("socket", connect)
attempt("signal", lambda: os.kill(o["pid"], 0))
attempt("list_dir", lambda: os.listdir(o["dir"]))
libc = ctypes.CDLL(None, use_errno=True)
found["ptrace"] = "attached" if libc.ptrace(16, o["pid"], 0, 0) == 0 else os.strerror(ctypes.get_errno())
put(me + "-found.json", found)
wait(other + "-found.json")
"#
    );
    let env = |me: &str, other: &str| format!("X = \"{}\", ME = \"{me}\", OTHER = \"{other}\"", x.display());
    let job_a = program_job(&dir, "a", (31800, 31809), &script, &env("a", "b"));
    let job_b = program_job(&dir, "b", (31810, 31819), &script, &env("b", "a"));
    let (tag_a, tag_b) = (fresh_tag(), fresh_tag());
    let (run_a, run_b) = (dir.join("run-a"), dir.join("run-b"));
    let a = spawn_launch(&tag_a, &job_a, &run_a);
    let b = spawn_launch(&tag_b, &job_b, &run_b);
    let (status_a, stderr_a) = wait_for(a, &run_a, 180);
    let (status_b, stderr_b) = wait_for(b, &run_b, 180);
    assert_eq!(status_a.code(), Some(0), "{stderr_a}");
    assert_eq!(status_b.code(), Some(0), "{stderr_b}");
    let warden = nix::unistd::User::from_name("warden").unwrap().unwrap().uid.as_raw();
    for me in ["a", "b"] {
        let found = json(&std::fs::read_to_string(x.join(format!("{me}-found.json"))).unwrap());
        let (uid, other) = (found["uid"].as_u64().unwrap(), found["other_uid"].as_u64().unwrap());
        assert_ne!(uid, other, "two live jobs share uid {uid}");
        assert_ne!(uid, u64::from(warden), "jobs run under uids of their own, not the shared account");
        assert_eq!(found["socket"], "Permission denied", "{me} reached the other job's KV socket: {found}");
        assert_eq!(found["signal"], "Operation not permitted", "{me} may signal the other job: {found}");
        assert_eq!(found["list_dir"], "Permission denied", "{me} may read the other job's directory: {found}");
        assert_ne!(found["ptrace"], "attached", "{me} traced the other job: {found}");
    }
    wait_gone(&tag_a);
    wait_gone(&tag_b);
}

/// A program that leaves its process group (`setsid`, double fork) and
/// would outlive the job is ended with it.
#[test]
fn a_program_that_daemonises_is_gone_after_the_job() {
    need_root();
    let dir = scratch("iso-daemon");
    let x = exchange(&dir);
    let script = format!(
        "{PRELUDE}{}",
        r#"
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in range(3):
            os.close(fd)
        put("daemon.json", {"pid": os.getpid(), "uid": os.getuid()})
        time.sleep(600)
    os._exit(0)
os.wait()
wait("daemon.json")
"#
    );
    let job = program_job(&dir, "daemon", (31820, 31829), &script, &format!("X = \"{}\"", x.display()));
    let (tag, run) = (fresh_tag(), dir.join("run"));
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 120);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let daemon = json(&std::fs::read_to_string(x.join("daemon.json")).unwrap());
    let (pid, uid) = (daemon["pid"].as_u64().unwrap() as u32, daemon["uid"].as_u64().unwrap() as u32);
    assert!(!alive(pid), "the daemonised program {pid} outlived its job");
    let left: Vec<u32> = warden_agent::host::jobuid::processes_of(uid);
    assert!(left.is_empty(), "processes of the job's uid {uid} outlived it: {left:?}");
    wait_gone(&tag);
}

/// Neither agents nor the user's program inherit the launcher's
/// environment: a marker set for the launcher is in none of them.
#[test]
fn agents_and_programs_start_with_a_clean_environment() {
    need_root();
    let dir = scratch("iso-env");
    let x = exchange(&dir);
    let script = format!("{PRELUDE}{}", "\nput(\"env.json\", dict(os.environ))\nwait(\"go\")\n");
    let job = program_job(&dir, "env", (31830, 31839), &script, &format!("X = \"{}\", MINE = \"1\"", x.display()));
    let (tag, run) = (fresh_tag(), dir.join("run"));
    let stderr = std::fs::File::create(run.with_extension("stderr")).unwrap();
    let child = Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--no-progress".as_ref()])
        .args(["--run-dir".as_ref(), run.as_os_str()])
        .env("WARDEN_TEST_TAG", &tag)
        .env("WARDEN_SECRET_MARKER", "do-not-leak")
        .env("MY_SIGNING_PASSPHRASE", "hunter2")
        .stderr(stderr)
        .spawn()
        .unwrap();
    let env = json(&wait_file(&x.join("env.json"), 60));
    let agents = Procs::agents(&tag).pids();
    assert_eq!(agents.len(), 3, "scheduler, server and worker agents");
    for pid in agents {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let text = String::from_utf8_lossy(&environ);
        assert!(!text.contains("do-not-leak") && !text.contains("hunter2"), "agent {pid} inherited: {text}");
    }
    put(&x, "go", "{}");
    let (status, stderr) = wait_for(child, &run, 60);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let keys: Vec<&str> = env.as_object().unwrap().keys().map(String::as_str).collect();
    assert!(!keys.contains(&"WARDEN_SECRET_MARKER") && !keys.contains(&"MY_SIGNING_PASSPHRASE"), "{keys:?}");
    assert!(keys.contains(&"PATH") && keys.contains(&"MINE") && keys.contains(&"WARDEN_KV"), "{keys:?}");
    wait_gone(&tag);
}

/// The attack on the checkpoint series: the job's uid replaces its series
/// with a link to a directory of root's, and a resumed launch would make
/// root hand that directory to the job. The uid cannot plant the link in
/// the root-owned checkpoint root; where it could (a root writable by it),
/// the resumed launch refuses the link and leaves its target untouched.
#[test]
fn a_series_replaced_by_a_link_is_refused_and_its_target_untouched() {
    need_root();
    let dir = scratch("iso-link");
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = dir.join("ckpt.key");
    assert!(Command::new(bin("warden")).args(["checkpoint", "keygen"]).arg(&key).status().unwrap().success());
    let ckpt = dir.join("ckpt");
    let section =
        format!("[checkpoint]\ndir = \"{}\"\nevery_steps = 20\nkey_file = \"{}\"\n", ckpt.display(), key.display());
    let job = JobFile::local().ports(31840, 31849).epochs(1).write(dir.join("job.toml"));
    let text = std::fs::read_to_string(&job).unwrap() + "\n" + &section;
    std::fs::write(&job, text).unwrap();
    let (tag, run) = (fresh_tag(), dir.join("run"));
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 120);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let plan = json(&std::fs::read_to_string(run.join("plan.json")).unwrap());
    let series = ckpt.join(plan["job_id"].as_str().unwrap());
    let uid = std::fs::metadata(&series).unwrap().uid();
    assert!(uid >= 1000 && uid != nix::unistd::User::from_name("warden").unwrap().unwrap().uid.as_raw());
    let series_md = std::fs::metadata(&series).unwrap();
    assert_eq!(series_md.mode() & 0o777, 0o700, "the series is its job's uid's alone");
    let root_md = std::fs::metadata(&ckpt).unwrap();
    assert_eq!((root_md.uid(), root_md.mode() & 0o777), (0, 0o711), "the checkpoint root is root's");

    // A directory of root's standing in for /etc.
    let target = dir.join("etc");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plant = || {
        Command::new("setpriv")
            .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
            .args(["sh", "-c", "mv \"$1\" \"$1.old\" && ln -s \"$2\" \"$1\"", "plant"])
            .arg(&series)
            .arg(&target)
            .output()
            .unwrap()
    };
    let out = plant();
    assert!(!out.status.success(), "the job's uid replaced its series in a root-owned checkpoint root");
    assert!(!series.is_symlink());

    // A checkpoint root the job's uid can write (as a root owned by the job
    // user would be): the link can be planted, and root does not follow it.
    std::os::unix::fs::chown(&ckpt, Some(uid), Some(uid)).unwrap();
    let out = plant();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(series.is_symlink());
    let resumed = dir.join("run2");
    let (status, stderr) = {
        let stderr = std::fs::File::create(resumed.with_extension("stderr")).unwrap();
        let child = Command::new(bin("warden"))
            .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--no-progress".as_ref()])
            .args(["--run-dir".as_ref(), resumed.as_os_str(), "--resume".as_ref(), run.as_os_str()])
            .env("WARDEN_TEST_TAG", &tag)
            .stderr(stderr)
            .spawn()
            .unwrap();
        wait_for(child, &resumed, 120)
    };
    assert_ne!(status.code(), Some(0), "the resumed launch went through a planted link: {stderr}");
    assert!(stderr.contains("symbolic link"), "the error names the link: {stderr}");
    let md = std::fs::metadata(&target).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (0, 0, 0o755), "the link's target was changed");
    wait_gone(&tag);
}

/// Another local user opens 100 idle connections to the job's ports while
/// it starts: the firewall refuses them (only the job's uid may connect to
/// its ports), so the job starts and finishes.
#[test]
fn idle_connections_from_another_local_user_do_not_stop_a_job() {
    need_root();
    let dir = scratch("iso-idle");
    let x = exchange(&dir);
    let script = format!("{PRELUDE}{}", "\nwait(\"go\")\n");
    let job = program_job(&dir, "idle", (31850, 31859), &script, &format!("X = \"{}\"", x.display()));
    let (tag, run) = (fresh_tag(), dir.join("run"));
    // The attacker starts first and keeps trying every port of the range
    // until the test is done, holding every connection it gets.
    let attacker = format!(
        r#"
import os, socket, time
held, refused = [], 0
stop = os.path.join("{x}", "go")
while not os.path.exists(stop):
    for port in range(31850, 31860):
        if len(held) >= 100:
            break
        s = socket.socket()
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
            held.append(s)
        except OSError:
            refused += 1
            s.close()
    time.sleep(0.01)
print(len(held), refused)
"#,
        x = x.display()
    );
    let attack = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", &attacker])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let launcher = spawn_launch(&tag, &job, &run);
    // Training runs (the program started) while the attack goes on.
    wait_file(&run.join("plan.json"), 60);
    let until = Instant::now() + Duration::from_secs(60);
    while Procs::agents(&tag).pids().len() < 3 {
        assert!(Instant::now() < until, "the job's agents never all started");
        std::thread::sleep(Duration::from_millis(20));
    }
    put(&x, "go", "{}");
    let (status, stderr) = wait_for(launcher, &run, 120);
    let attack = attack.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&attack.stdout);
    assert_eq!(status.code(), Some(0), "the job failed under the attack ({said}): {stderr}");
    let held: usize = said.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
    assert_eq!(held, 0, "another user held connections to the job's ports: {said}");
    wait_gone(&tag);
}

/// The user's program plants `model/x -> a file of root's` before the agent
/// writes the model: the fetch, as the job's uid and without following
/// links, refuses it, and the file never reaches the run directory.
#[test]
fn a_link_planted_in_the_model_directory_is_not_fetched() {
    need_root();
    let dir = scratch("iso-model");
    let x = exchange(&dir);
    let secret = dir.join("shadow");
    std::fs::write(&secret, "root-only-secret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let script = format!(
        "{PRELUDE}{}",
        format_args!(
            "\nmodel = os.path.join(os.environ[\"WARDEN_RUN_DIR\"], \"model\")\nos.makedirs(model, exist_ok=True)\nos.symlink({:?}, os.path.join(model, \"x\"))\n",
            secret.display().to_string()
        )
    );
    let job = program_job(&dir, "model", (31860, 31869), &script, &format!("X = \"{}\"", x.display()));
    let (tag, run) = (fresh_tag(), dir.join("run"));
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 120);
    assert_ne!(status.code(), Some(0), "a model directory holding a link was fetched: {stderr}");
    assert!(stderr.contains("symbolic link"), "the error names the link: {stderr}");
    for entry in walk(&run) {
        let text = std::fs::read(&entry).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&text).contains("root-only-secret"), "{} holds the secret", entry.display());
    }
    wait_gone(&tag);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The run directory and what the launcher writes there are the launching
/// user's alone.
#[test]
fn the_run_directory_is_private_to_the_launching_user() {
    need_root();
    let dir = scratch("iso-private");
    let x = exchange(&dir);
    let script = format!("{PRELUDE}{}", "\n");
    let job = program_job(&dir, "private", (31870, 31879), &script, &format!("X = \"{}\"", x.display()));
    let (tag, run) = (fresh_tag(), dir.join("run"));
    let (status, stderr) = wait_for(spawn_launch(&tag, &job, &run), &run, 120);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(std::fs::metadata(&run).unwrap().mode() & 0o777, 0o700);
    for entry in walk(&run) {
        let mode = std::fs::metadata(&entry).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", entry.display());
    }
    assert!(run.join("model/model.safetensors").exists());
    wait_gone(&tag);
}

/// `warden-agent stop-group --uid`, which the launcher runs as root to end
/// an agent that did not stop: only the job uid's processes in the group
/// are signalled, whatever else has come to share the group or the PID.
#[test]
fn stop_group_with_the_jobs_uid_signals_only_that_uids_processes() {
    use std::os::unix::process::CommandExt;
    need_root();
    let (job, other) = (2_000_070_001u32, 2_000_070_002u32);
    let sleeper = |uid: u32| format!("setpriv --reuid={uid} --regid={uid} --clear-groups sleep 60 &");
    let mut leader = Command::new("sh")
        .args(["-c", &format!("{} {} wait", sleeper(job), sleeper(other))])
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = leader.id();
    let until = Instant::now() + Duration::from_secs(10);
    while warden_agent::host::jobuid::processes_of(job).is_empty()
        || warden_agent::host::jobuid::processes_of(other).is_empty()
    {
        assert!(Instant::now() < until, "the sleepers never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = warden_agent::host::reap::start_ticks(pgid).unwrap();
    let out = Command::new(bin("warden-agent"))
        .args(["stop-group", &pgid.to_string(), &start.to_string(), "--grace-ms", "500", "--uid", &job.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(warden_agent::host::jobuid::processes_of(job).is_empty(), "the job's process survived");
    let others = warden_agent::host::jobuid::processes_of(other);
    assert_eq!(others.len(), 1, "another uid's process in the group was signalled");
    assert!(alive(pgid), "the root-owned leader was signalled");
    // Clean up as root.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), nix::sys::signal::Signal::SIGKILL);
    let _ = leader.wait();
}

/// The launcher killed outright (no teardown) while a program of the job
/// has daemonised: `warden stop RUN` ends every process of the job's uid,
/// removes the firewall table and releases the uid.
#[test]
fn warden_stop_after_a_killed_launcher_ends_the_jobs_uid_and_releases_it() {
    need_root();
    let dir = scratch("iso-stop");
    let x = exchange(&dir);
    let script = format!(
        "{PRELUDE}{}",
        r#"
if os.fork() == 0:
    os.setsid()
    for fd in range(3):
        os.close(fd)
    put("daemon.json", {"pid": os.getpid(), "uid": os.getuid()})
    time.sleep(600)
    os._exit(0)
wait("never", 600)
"#
    );
    let job = program_job(&dir, "stop", (31880, 31889), &script, &format!("X = \"{}\"", x.display()));
    let (tag, run) = (fresh_tag(), dir.join("run"));
    let mut launcher = spawn_launch(&tag, &job, &run);
    let daemon = json(&wait_file(&x.join("daemon.json"), 60));
    let (pid, uid) = (daemon["pid"].as_u64().unwrap() as u32, daemon["uid"].as_u64().unwrap() as u32);
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    wait_gone(&tag);
    assert!(alive(pid), "the daemon outlives a killed launcher until the job is cleaned up");
    let lease = Path::new(warden_agent::host::jobuid::LEASE_DIR).join(uid.to_string());
    assert!(lease.exists(), "the uid stays leased while its processes run");
    let out = Command::new(bin("warden")).arg("stop").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!alive(pid), "warden stop left the daemon {pid} running");
    assert!(!lease.exists(), "warden stop left the lease of uid {uid}");
    let table = warden_tests::job_table(&run);
    assert!(!warden_agent::host::firewall::list().unwrap().contains(&table), "warden stop left {table}");
}

/// `warden firewall clean` releases the leases of jobs that left nothing
/// behind (no table, no process), and only those ([`release_stale`]).
///
/// [`release_stale`]: warden_agent::host::jobuid::release_stale
#[test]
fn firewall_clean_releases_the_uids_of_ended_jobs_only() {
    need_root();
    let dir = std::path::Path::new(warden_agent::host::jobuid::LEASE_DIR);
    std::fs::create_dir_all(dir).unwrap();
    // Uids outside the default range, so no live job can hold them.
    let stale = dir.join("2000080001");
    let busy = dir.join("2000080002");
    let job = warden_agent::net::identity::JobId::generate();
    std::fs::write(&stale, format!("job={job}\nhost=localhost\n")).unwrap();
    std::fs::write(&busy, format!("job={job}\nhost=localhost\n")).unwrap();
    let mut sleeper = Command::new("setpriv")
        .args(["--reuid=2000080002", "--regid=2000080002", "--clear-groups", "sleep", "60"])
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while warden_agent::host::jobuid::processes_of(2_000_080_002).is_empty() {
        assert!(Instant::now() < until, "the sleeper never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // In-process: `warden firewall clean` would also remove the tables of
    // the other tests' live jobs.
    let live = warden_agent::host::firewall::list().unwrap();
    let released = warden_agent::host::jobuid::release_stale(&live);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let released = released.unwrap();
    assert!(released.contains(&2_000_080_001), "{released:?}");
    assert!(!stale.exists(), "the lease of an ended job was kept");
    assert!(busy.exists(), "the lease of a uid that still runs a process was released");
    let _ = std::fs::remove_file(&busy);
}
