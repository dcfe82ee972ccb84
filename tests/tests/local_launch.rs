//! `warden launch --local` end to end: the shipped job trains to a useful
//! accuracy and leaves a complete run directory; failures of every kind end
//! with a clear message and no process left behind.

use std::path::Path;
use std::process::{Command, Output};

use warden_tests::{JobFile, Procs, bin, fresh_tag, job_in, job_table, repo_root, scratch, start_long_job, wait_gone};

fn launch(tag: &str, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(bin("warden")).arg("launch").args(args).env("WARDEN_TEST_TAG", tag).output().unwrap()
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// The README's first command, `./scripts/train-local`, run from `/` on a
/// copy of the repository inside a directory only root can enter (a clone in
/// `/root` on Debian): the shipped job trains and leaves a complete run
/// directory under `runs/`. `WARDEN` points the script at the binaries this
/// suite built, so the test does not build a release of its own.
#[test]
fn the_readme_command_trains_the_shipped_job_from_a_directory_only_root_can_enter() {
    use std::os::unix::fs::PermissionsExt;
    let tag = fresh_tag();
    let base = scratch("run");
    std::fs::set_permissions(&*base, std::fs::Permissions::from_mode(0o700)).unwrap();
    let clone = base.join("warden");
    std::fs::create_dir_all(&clone).unwrap();
    for part in ["scripts", "configs", "data"] {
        let cp = Command::new("cp").arg("-a").arg(repo_root().join(part)).arg(clone.join(part)).status().unwrap();
        assert!(cp.success(), "cannot copy {part} into {}", clone.display());
    }
    let out = Command::new(clone.join("scripts/train-local"))
        .current_dir("/")
        .env("WARDEN", bin("warden"))
        .env("WARDEN_TEST_TAG", &tag)
        .output()
        .unwrap();
    let run = std::fs::canonicalize(clone.join("runs/latest")).unwrap_or_else(|e| {
        panic!("no runs/latest ({e}): {}", String::from_utf8_lossy(&out.stderr));
    });
    assert!(
        run.starts_with(clone.join("runs")) && run.file_name().unwrap().to_string_lossy().starts_with("fashion-local-")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("epoch 5/5") && stderr.contains("succeeded:"), "{stderr}");
    // The job's lifetime is said up front, not found out at hour 24.
    assert!(stderr.contains("for at most 24 h (max_hours)"), "{stderr}");
    let plan = Command::new(bin("warden"))
        .args(["plan".as_ref(), repo_root().join("configs/local.toml").as_os_str(), "--local".as_ref()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("lifetime: at most 24 h (max_hours)"), "{text}");
    assert!(text.contains("optimizer momentum 0.9, lr 0.1") && !text.contains("OptimizerSpec"), "{text}");
    // A run that succeeds has nothing to warn about: workers say goodbye to
    // their servers (TLS close_notify) instead of vanishing.
    assert!(!stderr.contains("dropped worker"), "a server saw a worker vanish: {stderr}");
    // Each phase says when it is done, in order.
    let phases = [
        "firewall table and a uid of the job's own on 1 host(s)",
        "5/5 processes enrolled",
        "5/5 processes started",
        "epoch 1/5",
    ];
    let at: Vec<usize> =
        phases.iter().map(|p| stderr.find(p).unwrap_or_else(|| panic!("no `{p}`: {stderr}"))).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "phases out of order: {stderr}");
    // The processes' INFO lines go to their logs, not the terminal.
    assert!(!stderr.contains("running as uid"), "{stderr}");
    for name in ["localhost-scheduler-0.log", "localhost-server-1.log", "localhost-worker-1.log"] {
        let log = std::fs::read_to_string(run.join("logs").join(name)).unwrap();
        assert!(log.contains("running as uid"), "{name}: {log}");
    }

    let s = summary(&run);
    assert_eq!(s["status"], "succeeded");
    assert_eq!(s["epochs"], 5);
    assert_eq!(s["seed"], 42);
    assert!(s["steps"].as_u64().unwrap() >= 300, "{s}");
    let acc = s["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.7, "test accuracy {acc} is not clearly above chance (0.1)");
    assert!(s["train_loss"].as_f64().unwrap() < 1.0);
    assert!(s["elapsed_s"].as_f64().unwrap() > 0.0);
    assert_eq!(s["processes"].as_array().unwrap().len(), 5);
    assert!(s["processes"].as_array().unwrap().iter().all(|p| p["exit_code"] == 0));

    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 6, "{metrics}");
    assert!(metrics.starts_with(
        "epoch,train_loss,test_loss,test_accuracy,steps,samples_per_s,bytes_pushed,bytes_pulled,elapsed_s\n"
    ));
    // Each epoch moved real bytes: at least every gradient and parameter once per step.
    let row: Vec<&str> = metrics.lines().nth(1).unwrap().split(',').collect();
    let floats = (784 * 10 + 10) as u64;
    let steps: u64 = row[4].parse().unwrap();
    assert!(row[6].parse::<u64>().unwrap() >= 2 * steps * floats * 4, "{metrics}");
    assert!(row[7].parse::<u64>().unwrap() >= 2 * steps * floats * 4, "{metrics}");
    assert!(row[5].parse::<f64>().unwrap() > 0.0);
    assert!(s["bytes_pushed"].as_u64().unwrap() > 0 && s["test_loss"].as_f64().unwrap() > 0.0);

    let logs: Vec<_> = std::fs::read_dir(run.join("logs")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(logs.len(), 5, "{logs:?}");

    // The model is safetensors with the softmax layout and no code.
    let model = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(model[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&model[8..8 + n]).unwrap();
    assert_eq!(header["fc0.weight"]["shape"], serde_json::json!([10, 784]));
    assert_eq!(header["fc0.bias"]["dtype"], "F32");
    assert_eq!(model.len(), 8 + n + (784 * 10 + 10) * 4);

    let png = std::fs::read(run.join("plot.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Secrets and scratch are gone; the run says which job it was.
    assert!(!run.join("nodes").exists());
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["job_id"], s["job_id"]);
    wait_gone(&tag);
}

#[test]
fn a_port_in_use_fails_the_job_cleanly() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = scratch("port");
    let job = job_in(&dir, (port, port + 20), &[]);
    let tag = fresh_tag();
    let run = dir.join("run");
    let out = launch(&tag, &[job.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("port {port} on localhost is already in use")), "{stderr}");
    let s = summary(&run);
    assert_eq!(s["status"], "failed");
    // The scheduler's port is the one held; another process may also find
    // its port taken by some other program on this machine (the range is
    // next to an ephemeral port), so accept any process naming its port.
    let failure = s["failure"].as_str().unwrap();
    assert!(failure.starts_with("localhost/") && failure.contains("is already in use"), "{s}");
    wait_gone(&tag);
}

#[test]
fn bad_input_is_refused_before_anything_starts() {
    let dir = scratch("bad");
    let tag = fresh_tag();

    let missing = job_in(&dir, (29700, 29720), &[("train-images-idx3-ubyte.gz", "nope.gz")]);
    let out =
        launch(&tag, &[missing.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), dir.join("r1").as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("[data] train_images") && stderr.contains("nope.gz does not exist"), "{stderr}");
    assert!(!dir.join("r1").exists(), "nothing is created for a job that cannot start");

    // Without --local the hosts are reached over SSH; an unreachable or
    // unknown host fails before anything starts, naming the host.
    let ok = job_in(
        &dir,
        (29700, 29720),
        &[("address = \"127.0.0.1\"", "address = \"127.0.0.1\"\nssh = \"ssh://127.0.0.1:9\"")],
    );
    let out = launch(&tag, &[ok.as_os_str(), "--run-dir".as_ref(), dir.join("r0").as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("localhost: cannot connect over SSH to `ssh://127.0.0.1:9`"), "{stderr}");
    // Every host is this machine: the way out is named.
    assert!(stderr.contains("to run it without SSH, `warden launch") && stderr.contains(" --local`"), "{stderr}");

    let used = dir.join("used");
    std::fs::create_dir_all(&used).unwrap();
    std::fs::write(used.join("keep.txt"), "an earlier run").unwrap();
    let out = launch(&tag, &[ok.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), used.as_os_str()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a run"));
    assert_eq!(std::fs::read_to_string(used.join("keep.txt")).unwrap(), "an earlier run");

    let tiny = job_in(&dir, (29700, 29720), &[("batch_size = 64", "batch_size = 100000")]);
    let out = launch(&tag, &[tiny.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), dir.join("r2").as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("fewer than batch_size = 100000; lower batch_size or use fewer workers"), "{stderr}");
    wait_gone(&tag);
}

#[test]
fn a_killed_worker_fails_the_job_and_nothing_is_left_running() {
    let tag = fresh_tag();
    let dir = scratch("kill-agent");
    let (child, run) = start_long_job(&tag, &dir, (29740, 29760));
    let agents = Procs::agents(&tag).pids();
    assert_eq!(agents.len(), 5, "{agents:?}");
    // Kill one agent by its PID (not by name).
    let victim = *agents.last().unwrap();
    assert!(Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let s = summary(&run);
    assert_eq!(s["status"], "failed");
    assert!(s["failure"].as_str().is_some_and(|f| !f.is_empty()), "{s}");
    wait_gone(&tag);
}

#[test]
fn agents_stop_when_the_launcher_dies() {
    let tag = fresh_tag();
    let dir = scratch("kill-launcher");
    let (mut child, run) = start_long_job(&tag, &dir, (29780, 29799));
    assert_eq!(Procs::agents(&tag).pids().len(), 5);
    // SIGKILL: the launcher gets no chance to clean up; the agents see their
    // control channel close and stop by themselves.
    assert!(Command::new("kill").args(["-9", &child.id().to_string()]).status().unwrap().success());
    let _ = child.wait();
    wait_gone(&tag);
    // The run directory still tells what happened, and `warden stop` cleans
    // up what the launcher could not (its firewall table).
    let status = Command::new(bin("warden")).arg("status").arg(&run).output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("ended without a summary: the launcher died"));
    let stop = Command::new(bin("warden")).arg("stop").arg(&run).output().unwrap();
    assert_eq!(stop.status.code(), Some(0), "{}", String::from_utf8_lossy(&stop.stderr));
    if warden_agent::host::harden::started_as_root() {
        assert!(!warden_agent::host::firewall::list().unwrap().contains(&job_table(&run)));
    }
}

#[test]
fn status_logs_and_stop_work_from_the_run_directory() {
    let tag = fresh_tag();
    let dir = scratch("status");
    let (launcher, run) = start_long_job(&tag, &dir, (29960, 29979));
    let status = Command::new(bin("warden")).arg("status").arg(&run).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("status: running (launcher pid"), "{text}");
    // Read for people: the epoch out of how many, its figures, the time left.
    assert!(text.contains("epoch ") && text.contains("/100000: train loss "), "{text}");
    assert!(text.contains("time left: about "), "{text}");
    // Every process, and how it stands.
    for label in ["scheduler[0]", "server[0]", "server[1]", "worker[0]", "worker[1]"] {
        assert!(text.contains(&format!("  localhost/{label}: running")), "{label}: {text}");
    }
    let logs = Command::new(bin("warden"))
        .args(["logs".as_ref(), run.as_os_str(), "--role".as_ref(), "worker".as_ref()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.lines().all(|l| l.starts_with("localhost/worker[")), "{text}");
    assert!(text.contains("localhost/worker[0]") && text.contains("localhost/worker[1]"), "{text}");
    assert!(!text.contains("CERTIFICATE REQUEST"), "PEM text in the logs: {text}");
    let tail = Command::new(bin("warden"))
        .args(["logs".as_ref(), run.as_os_str(), "--role".as_ref(), "server".as_ref(), "--tail".as_ref(), "2".as_ref()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tail.stdout);
    for rank in 0..2 {
        let lines = text.lines().filter(|l| l.starts_with(&format!("localhost/server[{rank}] "))).count();
        assert_eq!(lines, 2, "--tail 2 for server[{rank}]: {text}");
    }
    let stop = Command::new(bin("warden")).arg("stop").arg(&run).output().unwrap();
    assert_eq!(stop.status.code(), Some(0), "{}", String::from_utf8_lossy(&stop.stderr));
    let said = String::from_utf8_lossy(&stop.stdout);
    assert!(said.contains("stopped: model saved to"), "{said}");
    let out = launcher.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let status = Command::new(bin("warden")).arg("status").arg(&run).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("status: stopped") && text.contains("stopped by SIGTERM"), "{text}");
    assert!(text.contains("(weights after step "), "{text}");
    wait_gone(&tag);
    let bad = Command::new(bin("warden")).arg("status").arg(dir.path()).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "not a run directory");
}

#[test]
fn bench_commands_print_their_figures() {
    // The benchmarks work in fresh directories of the temporary directory
    // and leave nothing there.
    let tmp = scratch("bench-tmp");
    std::fs::set_permissions(&*tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for same_host in ["unix", "tcp"] {
        let out = Command::new(bin("warden"))
            .env("TMPDIR", tmp.path())
            .args(["bench", "ps", "--workers", "2", "--servers", "2", "--params", "1e4", "--iters", "3"])
            .args(["--compression", "2bit", "--chunk-kib", "4", "--same-host", same_host])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        let head = format!("warden ps: W=2 S=2 P=10000 compression=2bit same_host={same_host} steps_per_s=");
        assert!(stdout.starts_with(&head), "{stdout}");
        let gbps: f64 = stdout.trim().rsplit("worker_GBps=").next().unwrap().parse().unwrap();
        assert!(gbps > 0.0);
    }

    let out = Command::new(bin("warden"))
        .current_dir(repo_root())
        .args(["bench", "worker", "--hidden", "32", "--steps", "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("warden worker: mlp 784-32-10 batch=64 samples_per_s="), "{stdout}");

    let out = Command::new(bin("warden"))
        .env("TMPDIR", tmp.path())
        .args(["bench", "checkpoint", "--mib", "1", "--rounds", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(&*tmp).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "the benchmarks left {left:?} in the temporary directory");
    // --dir: files already there (even ones named as the bench's) stay as
    // they were; nothing else is left.
    let given = tmp.join("checkpoints");
    std::fs::create_dir(&given).unwrap();
    for name in ["bench.wck", "bench.plain", "keep"] {
        std::fs::write(given.join(name), name).unwrap();
    }
    let out = Command::new(bin("warden"))
        .args(["bench", "checkpoint", "--mib", "1", "--rounds", "1", "--dir"])
        .arg(&given)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let mut left: Vec<_> = std::fs::read_dir(&given).unwrap().flatten().map(|e| e.file_name()).collect();
    left.sort();
    assert_eq!(left, ["bench.plain", "bench.wck", "keep"], "--dir holds what it held before, and only that");
    for name in ["bench.wck", "bench.plain", "keep"] {
        assert_eq!(std::fs::read_to_string(given.join(name)).unwrap(), name, "{name} was changed");
    }

    let bad = Command::new(bin("warden")).args(["bench", "ps", "--params", "lots"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// Regression: `warden launch ... | head -2` closed the launcher's stderr;
/// the next progress line killed it before teardown, leaving its agents to
/// stop on their own and its firewall table behind.
#[test]
fn a_closed_terminal_does_not_stop_the_launcher_before_teardown() {
    use std::io::BufRead;
    let tag = fresh_tag();
    let dir = scratch("closed-stderr");
    let job = job_in(&dir, (29980, 29999), &[]);
    let run = dir.join("run");
    let mut child = Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run.as_os_str()])
        .env("WARDEN_TEST_TAG", &tag)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap()).read_line(&mut first).unwrap();
    // The reader (and with it the pipe) is dropped here.
    assert!(first.starts_with("warden: job"), "{first}");
    child.wait().unwrap();
    let summary = std::fs::read_to_string(run.join("summary.json")).unwrap();
    assert!(summary.contains("\"status\": \"succeeded\""), "{summary}");
    wait_gone(&tag);
    if warden_agent::host::harden::started_as_root() {
        assert!(!warden_agent::host::firewall::list().unwrap().contains(&job_table(&run)));
    }
}

/// `warden launch job.toml` from the job's own directory (a bare file name,
/// whose parent is the empty path) works like any other path.
#[test]
fn a_bare_job_file_name_launches_from_its_directory() {
    let tag = fresh_tag();
    let dir = scratch("bare");
    job_in(&dir, (31100, 31105), &[("epochs = 5", "epochs = 1")]);
    let out = Command::new(bin("warden"))
        .args(["launch", "job.toml", "--local", "--no-progress", "--run-dir", "run"])
        .current_dir(&dir)
        .env("WARDEN_TEST_TAG", &tag)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary(&dir.join("run"))["status"], "succeeded");
    wait_gone(&tag);
}

/// A process that stops answering without closing its connections (here:
/// SIGSTOP) is declared dead after `[training] heartbeat_timeout`, and the
/// job ends with that reason instead of hanging.
#[test]
fn a_silent_process_is_declared_dead_after_the_heartbeat_timeout() {
    let tag = fresh_tag();
    let dir = scratch("heartbeat");
    let job = JobFile::local()
        .ports(31140, 31150)
        .epochs(100000)
        .set("training", "heartbeat_timeout", 3)
        .write(dir.join("job.toml"));
    let run = dir.join("run");
    let child = warden_tests::spawn_launch(&tag, &job, &run);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default().lines().count() < 2 {
        assert!(std::time::Instant::now() < until, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(Procs::agents(&tag).pids().len(), 5);
    // A server: its peers notice the job's end in many ways (the abort, a
    // connection closed under them), sometimes before the scheduler's own
    // report reaches the launcher; the summary must still name the silent one.
    let victim = Procs::agents(&tag).comm("wd-server-1").first().expect("server 1 runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = std::time::Instant::now();
    // Without heartbeats the job would hang here: wait_for fails it instead.
    let (status, _) = warden_tests::wait_for(child, &run, 60);
    let took = stopped.elapsed();
    assert_eq!(status.code(), Some(1));
    let failure = summary(&run)["failure"].as_str().unwrap_or_default().to_string();
    assert!(failure.contains("server[1] sent nothing"), "{failure}");
    assert!(took < std::time::Duration::from_secs(3 + 15), "took {took:?} to notice");
    // Stopped, it could not obey the stop: its process group was ended.
    let log = std::fs::read_dir(run.join("logs"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with("-server-1.log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .expect("server 1 has a log");
    assert!(log.contains("[launcher] did not stop on request: process group"), "{log}");
    assert!(log.contains("killed with SIGKILL after the grace period"), "{log}");
    wait_gone(&tag);
}

/// SIGINT (Ctrl-C), SIGTERM (`warden stop`, a service manager) and SIGHUP
/// (the terminal closed) each lead to the same orderly stop: the model is
/// saved, no process, firewall table or job directory is left, the summary
/// says which signal stopped the job, and the launcher exits 130.
#[test]
fn every_stop_signal_tears_the_job_down_and_writes_the_summary() {
    use nix::sys::signal::Signal;
    let cases = [
        (Signal::SIGINT, (31900, 31919), "interrupted (Ctrl-C)"),
        (Signal::SIGTERM, (31920, 31939), "stopped by SIGTERM"),
        (Signal::SIGHUP, (31940, 31959), "stopped by SIGHUP"),
    ];
    for (signal, ports, said) in cases {
        let tag = fresh_tag();
        let dir = scratch(&format!("signal-{}", signal.as_str()));
        let (launcher, run) = start_long_job(&tag, &dir, ports);
        let plan: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
        let job_dir = Path::new("/var/lib/warden/jobs").join(plan["job_id"].as_str().unwrap());
        let root = warden_agent::host::harden::started_as_root();
        if root {
            assert!(job_dir.is_dir(), "{} while the job runs", job_dir.display());
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(launcher.id() as i32), signal).unwrap();
        let out = launcher.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{signal}: {stderr}");
        wait_gone(&tag);
        let s = summary(&run);
        assert_eq!(s["status"], "stopped", "{signal}: {s}\n{stderr}");
        assert!(s["stopped"].as_str().unwrap_or_default().contains(said), "{signal}: {s}\n{stderr}");
        assert!(s["failure"].is_null(), "{signal}: {s}");
        assert!(run.join("model/model.safetensors").is_file(), "{signal}: no model: {stderr}");
        assert!(s["model_step"].as_u64().is_some(), "{signal}: {s}");
        assert!(stderr.contains("stopped: ") && stderr.contains("the model holds the weights after step"), "{stderr}");
        if root {
            assert!(!warden_agent::host::firewall::list().unwrap().contains(&job_table(&run)), "{signal}: table left");
            assert!(!job_dir.exists(), "{signal}: {} left", job_dir.display());
        }
    }
}

/// Data under a directory only its owner may enter (a clone in root's home,
/// say) still trains: the worker's agent opens the files before it drops
/// to the job's uid and parses them after, through those descriptors.
#[test]
fn data_in_a_directory_the_job_cannot_enter_still_trains() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("private-data");
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    let shipped = repo_root().join("data/fashion-mnist-small");
    let mut job = JobFile::local().ports(31960, 31979).epochs(1);
    for (key, file) in [
        ("train_images", "train-images-idx3-ubyte.gz"),
        ("train_labels", "train-labels-idx1-ubyte.gz"),
        ("test_images", "t10k-images-idx3-ubyte.gz"),
        ("test_labels", "t10k-labels-idx1-ubyte.gz"),
    ] {
        std::fs::copy(shipped.join(file), data.join(file)).unwrap();
        std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o600)).unwrap();
        job = job.set("data", key, data.join(file));
    }
    let job = job.write(dir.join("job.toml"));
    let run = dir.join("run");
    let out = Command::new(bin("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run.as_os_str()])
        .args(["--no-progress", "-v"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(summary(&run)["status"], "succeeded");
    // -v: every process's INFO lines stream to the terminal under its label.
    for label in ["localhost/scheduler[0] ", "localhost/server[1] ", "localhost/worker[1] "] {
        assert!(stderr.lines().any(|l| l.starts_with(label) && l.contains("running as uid")), "{label}: {stderr}");
    }
}

/// A stopped job keeps exactly the work done: its model holds the weights
/// after the step it stopped at, bit for bit those of a job that trains
/// that many steps and ends. With one step per epoch (batch = the shard),
/// that job is the same job with `epochs` = the step.
#[test]
fn a_stopped_jobs_model_holds_the_weights_of_the_step_it_stopped_at() {
    let tag = fresh_tag();
    let dir = scratch("stop-keeps");
    // 8,000 samples, 2 workers: shards of 4,000, one batch of 3,000 each.
    let job = |ports: (u16, u16), epochs: u32| {
        JobFile::local().ports(ports.0, ports.1).epochs(epochs).set("training", "batch_size", 3000)
    };
    let (launcher, run) = warden_tests::start_long(&tag, &dir, job((31980, 31999), 100000));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(launcher.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = launcher.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    wait_gone(&tag);
    let s = summary(&run);
    assert_eq!(s["status"], "stopped", "{s}");
    let step = s["model_step"].as_u64().expect("the step of the saved weights");
    assert!(step >= 1, "{s}");

    let again = scratch("stop-keeps-again");
    let job2 = job((32000, 32019), step as u32).write(again.join("job.toml"));
    let run2 = again.join("run");
    let out = launch(
        &tag,
        &[job2.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run2.as_os_str(), "--no-progress".as_ref()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let spec = warden_agent::job::spec::JobSpec::load(&job2).unwrap().0.model;
    let stopped = warden_agent::store::artifact::read_model(&run.join("model"), &spec).unwrap();
    let finished = warden_agent::store::artifact::read_model(&run2.join("model"), &spec).unwrap();
    assert_eq!(stopped.len(), finished.len());
    let differ = stopped.iter().zip(&finished).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} weights differ from a run of {step} steps", stopped.len());
}

/// `launch --detach` returns once the run has started, its launcher in a
/// session of its own: the hangup of the session it was started from (what
/// closing a terminal sends) does not reach it; `status`, `logs` and `stop`
/// work on it, and the stop keeps the model.
#[test]
fn a_detached_job_survives_its_sessions_hangup_and_stops_with_its_model() {
    use std::os::unix::process::CommandExt;
    let tag = fresh_tag();
    let dir = scratch("detach");
    let job = JobFile::local().ports(32040, 32059).epochs(100000).write(dir.join("job.toml"));
    let run = dir.join("run");
    // A shell in a process group of its own launches detached, says how
    // that went, then hangs its whole group up.
    let script = format!(
        "'{}' launch '{}' --local --run-dir '{}' --detach; echo \"rc=$?\"; kill -HUP 0",
        bin("warden").display(),
        job.display(),
        run.display()
    );
    let out = Command::new("sh").args(["-c", &script]).env("WARDEN_TEST_TAG", &tag).process_group(0).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rc=0"), "{stdout}{stderr}");
    assert!(stderr.contains("detached: launcher pid ") && stderr.contains("warden stop "), "{stderr}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    let pid = nix::unistd::Pid::from_raw(record["launcher_pid"].as_i64().unwrap() as i32);
    assert_eq!(nix::unistd::getsid(Some(pid)).unwrap(), pid, "the launcher leads a session of its own");
    // Training goes on after the hangup: epochs keep coming.
    let epochs = || std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default().lines().count();
    let at_hangup = epochs();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while epochs() < at_hangup + 2 {
        assert!(
            std::time::Instant::now() < until,
            "no epoch after the hangup: {}",
            std::fs::read_to_string(run.join("launcher.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new(bin("warden")).arg("status").arg(&run).output().unwrap();
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("status: running"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let stop = Command::new(bin("warden")).arg("stop").arg(&run).output().unwrap();
    assert_eq!(stop.status.code(), Some(0), "{}", String::from_utf8_lossy(&stop.stderr));
    wait_gone(&tag);
    let s = summary(&run);
    assert_eq!(s["status"], "stopped", "{s}");
    assert!(run.join("model/model.safetensors").is_file());
    let log = std::fs::read_to_string(run.join("launcher.log")).unwrap();
    assert!(log.contains("stopped: stopped by SIGTERM"), "{log}");
}

/// Runs launched without `--run-dir` go to `./runs`, each under a name of
/// its own even within one second; `runs/latest` points at the newest and
/// `warden runs` lists them all with their status.
#[test]
fn runs_are_listed_and_latest_points_at_the_newest() {
    let tag = fresh_tag();
    let dir = scratch("runs-list");
    let job = JobFile::local().ports(32080, 32099).epochs(1).write(dir.join("job.toml"));
    let launch_here = || {
        Command::new(bin("warden"))
            .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--no-progress".as_ref()])
            .current_dir(&*dir)
            .env("WARDEN_TEST_TAG", &tag)
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let out = launch_here();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut runs: Vec<_> = std::fs::read_dir(dir.join("runs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "latest")
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let newest = summary(&dir.join("runs").join(&runs[1]));
    let latest = summary(&dir.join("runs/latest"));
    assert_eq!(latest["job_id"], newest["job_id"], "runs/latest is not the newest run");
    let out = Command::new(bin("warden")).arg("runs").current_dir(&*dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.starts_with("RUN "), "{text}");
    for name in &runs {
        let row = text.lines().find(|l| l.starts_with(name.as_str())).unwrap_or_else(|| panic!("{name}: {text}"));
        assert!(row.contains("succeeded") && row.contains("1/1"), "{row}");
    }
    assert!(!text.lines().any(|l| l.starts_with("latest")), "{text}");
    wait_gone(&tag);
}

/// Reads a run's TensorBoard events with the `tensorboard` package's own
/// reader: every scalar tag with its (step, value) points.
const READ_EVENTS: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

/// While a job runs, `--metrics-listen` serves its figures for Prometheus
/// (and a job whose epochs cannot fit its `max_hours` is told so);
/// the run directory gets step-level figures in `steps.csv` and TensorBoard
/// event files that TensorBoard's own reader reads back, epoch figures
/// equal to `metrics.csv`'s.
#[test]
fn a_job_serves_prometheus_figures_and_writes_steps_and_tensorboard_events() {
    let Some(py) = warden_tests::interop_python("tensorboard") else { return };
    let tag = fresh_tag();
    let dir = scratch("telemetry");
    // Small batches and a one-hour lifetime: 100,000 epochs cannot fit, and
    // the launcher says so after the first.
    let job = JobFile::local()
        .ports(32170, 32189)
        .epochs(100000)
        .set("training", "batch_size", 8)
        .set("job", "max_hours", 1)
        .write(dir.join("job.toml"));
    let run = dir.join("run");
    let args = [job.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run.as_os_str()];
    let metrics = ["--metrics-listen".as_ref(), "32190".as_ref()];
    let launch_args: Vec<&std::ffi::OsStr> = ["launch".as_ref()].into_iter().chain(args).chain(metrics).collect();
    let launcher = warden_tests::Launcher::start(&tag, &launch_args, &dir);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let scraped = loop {
        let out = Command::new("curl").args(["-s", "http://127.0.0.1:32190/metrics"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("warden_test_accuracy{") && text.contains("warden_step{") {
            break text;
        }
        assert!(std::time::Instant::now() < until, "no figures at /metrics: {text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    for name in ["warden_train_loss", "warden_learning_rate", "warden_samples_per_second", "warden_epochs"] {
        assert!(
            scraped.contains(&format!("# TYPE {name} gauge\n{name}{{warden_job=\"fashion-local\"}} ")),
            "{name}: {scraped}"
        );
    }
    assert!(scraped.contains("warden_learning_rate{warden_job=\"fashion-local\"} 0.1\n"), "{scraped}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(launcher.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let out = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("metrics for Prometheus: http://127.0.0.1:32190/metrics"), "{stderr}");
    assert!(
        stderr.contains("warning: at this pace the 100000 epochs need about")
            && stderr.contains("but the job ends at 1 h ([job] max_hours"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("at this pace").count(), 1, "said once: {stderr}");
    wait_gone(&tag);

    let steps = std::fs::read_to_string(run.join("steps.csv")).unwrap();
    assert!(
        steps.starts_with("step,epoch,wall_time,elapsed_s,train_loss,lr,samples_per_s,bytes_pushed,bytes_pulled\n")
    );
    let numbers: Vec<u64> = steps.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert!(numbers.len() >= 2 && numbers.windows(2).all(|w| w[0] < w[1]), "{steps}");

    let read = Command::new(&py).args(["-c", READ_EVENTS]).arg(run.join("tensorboard")).output().unwrap();
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let events: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    let points = |tag: &str| events[tag].as_array().unwrap_or_else(|| panic!("no `{tag}`: {events}")).clone();
    assert_eq!(points("train/loss").len(), numbers.len(), "one point per steps.csv row");
    assert_eq!(points("train/learning_rate")[0][1].as_f64().map(|v| v as f32), Some(0.1));
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let accuracy: Vec<f64> = metrics.lines().skip(1).map(|l| l.split(',').nth(3).unwrap().parse().unwrap()).collect();
    let tb: Vec<f64> = points("epoch/test_accuracy").iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert_eq!(tb.len(), accuracy.len(), "{events}");
    for (a, b) in accuracy.iter().zip(&tb) {
        assert!((a - b).abs() < 1e-5, "metrics.csv {a}, TensorBoard {b}");
    }
}
