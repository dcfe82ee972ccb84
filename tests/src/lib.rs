//! Helpers for warden's integration tests.
//!
//! - [`bin`]: the built `warden` / `warden-agent` binaries.
//! - [`TestPki`]: a job CA and certificates for any identity, valid or not.
//! - [`RoleCluster`]: a real scheduler and server role running in this
//!   process on loopback, started with one call, for attacking the server's
//!   port exactly as a peer on the network would.
//! - [`agent_pids_tagged`]: processes that carry a test's tag, for checking
//!   that nothing was left running.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use warden_agent::control::Event;
use warden_agent::identity::{Identity, JobId, Role};
use warden_agent::pki::{JobCa, NodeKey};
use warden_agent::plan::Plan;
use warden_agent::roles::RoleCtx;
use warden_agent::spec::JobSpec;
use warden_agent::tls::TlsIdentity;
use warden_agent::wire::Message;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// Path of a workspace binary built next to this test executable
/// (`cargo build --bins`, which `scripts/test-all` runs first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test-all does)",
        path.display()
    );
    path
}

/// A fresh job CA plus helpers to issue certificates.
pub struct TestPki {
    pub job: JobId,
    pub ca: JobCa,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    pub fn new() -> TestPki {
        let job = JobId::generate();
        let ca = JobCa::new(&job, Duration::from_secs(3600)).expect("CA");
        TestPki { job, ca }
    }

    pub fn id(&self, role: Role, rank: u32) -> Identity {
        Identity { job: self.job.clone(), role, rank }
    }

    /// Credentials for `role[rank]` with an IP SAN of 127.0.0.1.
    pub fn issue(&self, role: Role, rank: u32) -> TlsIdentity {
        let me = self.id(role, rank);
        let key = NodeKey::generate().unwrap();
        let cert = self.ca.sign_csr(&key.csr_pem(&me).unwrap(), &me, Some("127.0.0.1".parse().unwrap())).unwrap();
        TlsIdentity::new(me, &cert, key.pkcs8_der(), self.ca.cert_pem()).unwrap()
    }

    /// (cert PEM, key PKCS#8 DER) valid only in the past.
    pub fn issue_expired(&self, role: Role, rank: u32) -> (String, Vec<u8>) {
        let me = self.id(role, rank);
        let key = NodeKey::generate().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let cert = self
            .ca
            .sign_csr_valid(
                &key.csr_pem(&me).unwrap(),
                &me,
                Some("127.0.0.1".parse().unwrap()),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap();
        (cert, key.pkcs8_der().to_vec())
    }
}

/// A small job file for role-level tests on `ports`.
pub fn tiny_job(ports: (u16, u16), extra: &str) -> String {
    format!(
        r#"
[job]
name = "role-test"
seed = 1

[cluster]
user = "warden"
ports = [{}, {}]

[[cluster.hosts]]
address = "127.0.0.1"
scheduler = 1
servers = 1
workers = 1

[model]
kind = "softmax"
inputs = 4
classes = 2

[data]
format = "idx"
train_images = "x"
train_labels = "x"
test_images = "x"
test_labels = "x"

[optimizer]
kind = "sgd"
lr = 0.5

[training]
epochs = 1
batch_size = 1

[limits]
first_message_timeout_ms = 500
{extra}
"#,
        ports.0, ports.1
    )
}

/// Two consecutive free loopback ports, already bound.
pub fn bind_two() -> (std::net::TcpListener, std::net::TcpListener) {
    for _ in 0..200 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if !(1024..65000).contains(&base) {
            continue;
        }
        let (Ok(a), Ok(b)) =
            (std::net::TcpListener::bind(("127.0.0.1", base)), std::net::TcpListener::bind(("127.0.0.1", base + 1)))
        else {
            continue;
        };
        return (a, b);
    }
    panic!("no two consecutive free ports on loopback");
}

/// Two consecutive loopback ports from `base`, bound (for tests that keep
/// to a range of ports of their own).
pub fn bind_at(base: u16) -> (std::net::TcpListener, std::net::TcpListener) {
    let bind =
        |port| std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("127.0.0.1:{port}: {e}"));
    (bind(base), bind(base + 1))
}

/// A real scheduler and server role of a one-server, one-worker job, running
/// in this process. After [`RoleCluster::start`] the job has started (a
/// legitimate worker registered), so the server is serving its port.
pub struct RoleCluster {
    pub pki: TestPki,
    pub spec: JobSpec,
    pub plan: Plan,
    pub server_addr: SocketAddr,
    pub events: Arc<Mutex<Vec<Event>>>,
    /// The legitimate worker's scheduler connection (kept open).
    pub worker_sched: warden_agent::conn::ClientConn,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RoleCluster {
    pub async fn start(extra_toml: &str) -> RoleCluster {
        Self::start_on(bind_two(), extra_toml, &[]).await
    }

    /// [`RoleCluster::start`] on the given listeners (scheduler, server),
    /// with each `(from, to)` of `replace` applied to the job file once.
    pub async fn start_on(
        listeners: (std::net::TcpListener, std::net::TcpListener),
        extra_toml: &str,
        replace: &[(&str, &str)],
    ) -> RoleCluster {
        let (l_sched, l_server) = listeners;
        let ports = (l_sched.local_addr().unwrap().port(), l_server.local_addr().unwrap().port());
        let mut text = tiny_job(ports, extra_toml);
        for (from, to) in replace {
            assert!(text.contains(from), "{from}");
            text = text.replacen(from, to, 1);
        }
        let spec = JobSpec::parse("role-test.toml", &text, Path::new(".")).expect("valid test job");
        let pki = TestPki::new();
        let plan = Plan::new(&spec, &pki.job, true);
        assert_eq!(plan.scheduler().port, Some(ports.0));
        assert_eq!(plan.get(Role::Server, 0).unwrap().port, Some(ports.1));
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let events = events.clone();
            Arc::new(move |e: Event| events.lock().unwrap().push(e)) as warden_agent::roles::EventSink
        };
        let ctx = |role, rank| RoleCtx {
            spec: spec.clone(),
            plan: plan.clone(),
            seed: 1,
            tls: pki.issue(role, rank),
            events: sink.clone(),
            workdir: std::env::temp_dir(),
            checkpoint: None,
            resume: false,
            initial: warden_agent::roles::initial_weights(&spec, role, false).unwrap(),
        };
        let mut tasks = Vec::new();
        for (l, c, is_sched) in [(l_sched, ctx(Role::Scheduler, 0), true), (l_server, ctx(Role::Server, 0), false)] {
            l.set_nonblocking(true).unwrap();
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            tasks.push(tokio::spawn(async move {
                let r = if is_sched {
                    warden_agent::roles::scheduler::run(c, l).await
                } else {
                    warden_agent::roles::server::run(c, l).await
                };
                if let Err(e) = r {
                    eprintln!("role ended: {e}");
                }
            }));
        }
        let worker = pki.issue(Role::Worker, 0);
        let mut worker_sched = warden_agent::conn::connect(
            &worker,
            pki.id(Role::Scheduler, 0),
            plan.scheduler().socket().unwrap(),
            1 << 20,
            Duration::from_secs(10),
        )
        .await
        .expect("the legitimate worker joins");
        worker_sched.send(&Message::Register).await.unwrap();
        assert_eq!(worker_sched.recv().await.unwrap(), Message::Start);
        let server_addr = plan.get(Role::Server, 0).unwrap().socket().unwrap();
        RoleCluster { pki, spec, plan, server_addr, events, worker_sched, tasks }
    }

    /// Connects to the server as the legitimate worker 0. A server holds
    /// one connection per identity, so this waits (up to 10 s) until it has
    /// seen the end of worker 0's previous connection.
    pub async fn worker_conn(&self) -> warden_agent::conn::ClientConn {
        self.worker_conn_as(0).await
    }

    /// [`RoleCluster::worker_conn`] with a worker certificate of `rank`
    /// (the plan has only worker 0, but the handshake checks job and role).
    pub async fn worker_conn_as(&self, rank: u32) -> warden_agent::conn::ClientConn {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match self.try_conn(Role::Worker, rank, Role::Server).await {
                Ok(conn) => return conn,
                Err(warden_agent::conn::ConnError::Refused { message, .. })
                    if message.contains("already connected") && Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("a legitimate worker connects: {e}"),
            }
        }
    }

    /// One attempt to connect as `role[rank]` to the scheduler or the server.
    pub async fn try_conn(
        &self,
        role: Role,
        rank: u32,
        to: Role,
    ) -> Result<warden_agent::conn::ClientConn, warden_agent::conn::ConnError> {
        let addr = if to == Role::Server { self.server_addr } else { self.plan.scheduler().socket().unwrap() };
        warden_agent::conn::connect(
            &self.pki.issue(role, rank),
            self.pki.id(to, 0),
            addr,
            1 << 20,
            Duration::from_secs(10),
        )
        .await
    }
}

impl Drop for RoleCluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One honest step on a worker connection `w` from version `step`: pull,
/// push a gradient of ones, pull the update, and check it is exactly SGD
/// with the test job's lr 0.5 (so nothing else changed the parameters or
/// the optimizer).
pub async fn honest_sgd_step(w: &mut warden_agent::conn::ClientConn, step: u64) {
    w.send(&Message::Pull { min_version: step }).await.unwrap();
    let Message::Params { version, data: before } = w.recv().await.unwrap() else { panic!("no params") };
    assert_eq!(version, step);
    w.send(&Message::Push { step, data: vec![1.0; before.len()] }).await.unwrap();
    w.send(&Message::Pull { min_version: step + 1 }).await.unwrap();
    let Message::Params { version, data: after } = w.recv().await.unwrap() else { panic!("no params") };
    assert_eq!(version, step + 1);
    for (b, a) in before.iter().zip(&after) {
        assert!((b - 0.5 - a).abs() < 1e-5, "step {step}: expected SGD with lr 0.5: {b} -> {a}");
    }
}

/// PIDs of live processes whose environment holds `WARDEN_TEST_TAG=tag`.
pub fn agent_pids_tagged(tag: &str) -> Vec<u32> {
    let needle = format!("WARDEN_TEST_TAG={tag}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() {
            continue;
        }
        let Ok(env) = std::fs::read(entry.path().join("environ")) else { continue };
        // Zombies have an empty environ; they are gone in every sense that matters here.
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// A fresh random tag for [`agent_pids_tagged`].
pub fn fresh_tag() -> String {
    JobId::generate().to_string()
}

/// A fresh scratch directory for one test under the system's temporary
/// directory, removed with all it holds when the returned guard drops.
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("warden-{name}-{}-{}", std::process::id(), fresh_tag()));
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A test's scratch directory; derefs to its path. Dropping it removes the
/// directory, also when the test panicked: run directories and checkpoints
/// reach hundreds of megabytes, and a suite that keeps them fills the disk
/// after a few runs (which is how a CI run once failed with ENOSPC). Set
/// `WARDEN_KEEP_SCRATCH=1` to keep them for a post-mortem.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("WARDEN_KEEP_SCRATCH").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("kept scratch directory {} (WARDEN_KEEP_SCRATCH)", self.0.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("could not remove scratch directory {}: {e}", self.0.display());
        }
    }
}

/// configs/local.toml rewritten into `dir` with absolute data paths, other
/// ports and any replacements given.
pub fn job_in(dir: &Path, ports: (u16, u16), replace: &[(&str, &str)]) -> PathBuf {
    let data = repo_root().join("data");
    let mut text = std::fs::read_to_string(repo_root().join("configs/local.toml"))
        .unwrap()
        .replace("../data", data.to_str().unwrap())
        .replace("ports = [29500, 29599]", &format!("ports = [{}, {}]", ports.0, ports.1));
    for (from, to) in replace {
        assert!(text.contains(from), "{from}");
        text = text.replacen(from, to, 1);
    }
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn wait_gone(tag: &str) {
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        if agent_pids_tagged(tag).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("processes left behind: {:?}", agent_pids_tagged(tag));
}

/// `warden launch JOB --local --no-progress --run-dir RUN` in the
/// background, tagged; its stderr goes to `RUN.stderr` (a file, so a
/// chatty launcher never blocks on a full pipe), which [`wait_for`] returns.
pub fn spawn_launch(tag: &str, job: &Path, run: &Path) -> std::process::Child {
    let stderr = std::fs::File::create(run.with_extension("stderr")).unwrap();
    Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--no-progress".as_ref()])
        .args(["--run-dir".as_ref(), run.as_os_str()])
        .env("WARDEN_TEST_TAG", tag)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Waits at most `secs` for a launcher started by [`spawn_launch`] for
/// `run`: a broken behaviour fails the test instead of hanging it (the
/// launcher is killed first). Returns its exit status and stderr.
pub fn wait_for(mut child: std::process::Child, run: &Path, secs: u64) -> (std::process::ExitStatus, String) {
    let until = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the launcher did not exit within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(run.with_extension("stderr")).unwrap_or_default())
}

/// Starts a long job in the background and waits until training runs.
/// A launcher started by a test, its stderr drained as it runs (a full pipe
/// would block the launcher on its next line) and kept for the test.
pub struct Launcher {
    child: std::process::Child,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Launcher {
    /// Wraps `child`, whose stderr must be piped.
    pub fn drained(mut child: std::process::Child) -> Launcher {
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let _ = std::io::Read::read_to_end(&mut pipe, &mut all);
                all
            })
        });
        Launcher { child, stderr }
    }

    /// The launcher's PID.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// Waits for it to exit; its exit status and everything it wrote to stderr.
    pub fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        let status = self.child.wait()?;
        let stderr = self.stderr.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default();
        Ok(std::process::Output { status, stdout: Vec::new(), stderr })
    }
}

/// A test that fails while its launcher runs must not leave the job
/// running (holding its ports for the next test): the launcher is asked to
/// stop (SIGINT, an orderly teardown), then killed.
impl Drop for Launcher {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let until = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_long_job(tag: &str, dir: &Path, ports: (u16, u16)) -> (Launcher, PathBuf) {
    let job = job_in(dir, ports, &[("epochs = 5", "epochs = 100000")]);
    let run = dir.join("run");
    let child = Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run.as_os_str()])
        .env("WARDEN_TEST_TAG", tag)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child = Launcher::drained(child);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default();
        if metrics.lines().count() >= 2 {
            break;
        }
        assert!(Instant::now() < until, "the long job never finished an epoch");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, run)
}

pub fn agent_pids(tag: &str) -> Vec<u32> {
    agent_pids_tagged(tag)
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == "warden-agent"))
        })
        .collect()
}

/// The firewall table name of the job in `run`.
pub fn job_table(run: &std::path::Path) -> String {
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    let id = plan["job_id"].as_str().unwrap();
    format!("warden_{}", &id[..12])
}

pub mod netns;
pub mod netns_transport;

/// The PID of the live agent of job `tag` that runs `comm` (the name each
/// agent gives itself: `wd-scheduler`, `wd-server-0`, `wd-worker-1`, ...).
pub fn agent_pid_named(tag: &str, comm: &str) -> Option<u32> {
    agent_pids(tag)
        .into_iter()
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm))
}

#[cfg(test)]
mod scratch_tests {
    /// The guard removes its directory with everything in it, also when
    /// the test holding it panics (and keeps it under WARDEN_KEEP_SCRATCH).
    #[test]
    fn scratch_directories_are_removed_on_drop_and_on_panic() {
        let keep = std::env::var_os("WARDEN_KEEP_SCRATCH").is_some_and(|v| !v.is_empty() && v != "0");
        let dir = super::scratch("guard");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/file"), b"x").unwrap();
        let path = dir.to_path_buf();
        drop(dir);
        assert_eq!(path.exists(), keep);

        let held = std::sync::Mutex::new(None);
        let r = std::panic::catch_unwind(|| {
            let dir = super::scratch("guard-panic");
            *held.lock().unwrap() = Some(dir.to_path_buf());
            panic!("a failing test");
        });
        assert!(r.is_err());
        let held = held.lock().unwrap().clone().unwrap();
        assert_eq!(held.exists(), keep);
        if keep {
            let _ = (std::fs::remove_dir_all(&path), std::fs::remove_dir_all(&held));
        }
    }
}
