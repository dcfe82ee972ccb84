//! The built binaries ([`bin`]) and `warden launch` run by tests: in the
//! background with a deadline ([`spawn_launch`], [`wait_for`]), with its
//! stderr drained and an orderly stop if the test fails ([`Launcher`]),
//! or as a long job that trains until stopped ([`start_long_job`]); and
//! what a run directory tells ([`job_table`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::JobFile;

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

    /// Runs `warden ARGS` in `cwd`, tagged for [`crate::wait_gone`], its
    /// stderr drained.
    pub fn start<S: AsRef<std::ffi::OsStr>>(tag: &str, args: &[S], cwd: &Path) -> Launcher {
        let child = Command::new(bin("warden"))
            .args(args)
            .current_dir(cwd)
            .env("WARDEN_TEST_TAG", tag)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Launcher::drained(child)
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

/// Starts `configs/local.toml` on `ports` for 100,000 epochs in the
/// background, tagged, and waits (at most 30 s) until it has finished an
/// epoch. Returns the launcher and the run directory, `dir/run`.
pub fn start_long_job(tag: &str, dir: &Path, ports: (u16, u16)) -> (Launcher, PathBuf) {
    start_long(tag, dir, JobFile::local().ports(ports.0, ports.1).epochs(100000))
}

/// [`start_long_job`] with a job file of the caller's.
pub fn start_long(tag: &str, dir: &Path, job: JobFile) -> (Launcher, PathBuf) {
    let job = job.write(dir.join("job.toml"));
    let run = dir.join("run");
    let args = ["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run.as_os_str()];
    let child = Launcher::start(tag, &args, dir);
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

/// The firewall table name of the job in `run`.
pub fn job_table(run: &std::path::Path) -> String {
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    let id = plan["job_id"].as_str().unwrap();
    format!("warden_{}", &id[..12])
}

/// The python of the interoperability venv `scripts/test-all` makes
/// (model-signing, numpy, tensorboard), if it can import `module`; `None`
/// only when `WARDEN_SKIP_INTEROP` is set, otherwise a missing venv fails
/// the test with what to run.
pub fn interop_python(module: &str) -> Option<PathBuf> {
    let tool = std::env::var_os("WARDEN_MODEL_SIGNING")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/model-signing-venv/bin/model_signing"));
    let py = tool.parent().expect("a bin directory").join("python");
    let has = Command::new(&py).args(["-c", &format!("import {module}")]).status().is_ok_and(|s| s.success());
    if has {
        return Some(py);
    }
    if std::env::var_os("WARDEN_SKIP_INTEROP").is_some() {
        return None;
    }
    panic!("{} with {module} is missing: run ./scripts/test-all (WARDEN_SKIP_INTEROP=1 skips this test)", py.display());
}

/// Whether a test that needs what `why` names can run (`ok`): when it
/// cannot, it fails, unless `WARDEN_ALLOW_UNPRIVILEGED_TESTS` says the run
/// knowingly skips such tests (CI runs as root and installs what they need).
pub fn require(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("WARDEN_ALLOW_UNPRIVILEGED_TESTS").is_some() {
        eprintln!("SKIPPED (WARDEN_ALLOW_UNPRIVILEGED_TESTS is set): {why}");
        return false;
    }
    panic!("{why}; set WARDEN_ALLOW_UNPRIVILEGED_TESTS=1 to skip it knowingly");
}

/// [`require`] root.
pub fn require_root() -> bool {
    require(warden_agent::host::harden::started_as_root(), "this test needs root (CI runs as root)")
}
