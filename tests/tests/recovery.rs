//! Recovery from node failures: with `on_failure = "fail"` a
//! killed process ends the job promptly and by name; with `"restart"` the
//! launcher starts the job again from the newest committed checkpoint, as
//! often as `max_restarts` allows, and records every restart.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use warden_tests::{JobFile, Procs, fresh_tag, scratch, spawn_launch, wait_for, wait_gone};

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Waits (at most `secs`) until `check` holds.
fn until(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the agent named `comm` that is not `old`, and kills it.
fn kill_agent(tag: &str, comm: &str, old: Option<u32>) -> u32 {
    let mut pid = None;
    until(60, comm, || {
        pid = Procs::agents(tag).comm(comm).first().filter(|p| Some(*p) != old);
        pid.is_some()
    });
    let pid = pid.unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    pid
}

fn checkpoint_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.with_extension("stderr")).unwrap_or_default().matches("checkpoint at step").count()
}

#[test]
fn with_on_failure_fail_a_killed_worker_ends_the_job_naming_it() {
    killed_process_ends_the_job("wd-worker-1", "localhost/worker[1]", (31200, 31210));
}

#[test]
fn with_on_failure_fail_a_killed_server_ends_the_job_naming_it() {
    killed_process_ends_the_job("wd-server-0", "localhost/server[0]", (31236, 31246));
}

fn killed_process_ends_the_job(comm: &str, label: &str, ports: (u16, u16)) {
    let tag = fresh_tag();
    let dir = scratch("kill-fail");
    let job = JobFile::local()
        .ports(ports.0, ports.1)
        .epochs(100000)
        .set("training", "heartbeat_timeout", 3)
        .write(dir.join("job.toml"));
    let run = dir.join("run");
    let child = spawn_launch(&tag, &job, &run);
    until(60, "the first epoch", || {
        std::fs::read_to_string(run.join("metrics.csv")).unwrap_or_default().lines().count() >= 2
    });
    kill_agent(&tag, comm, None);
    let killed = Instant::now();
    let (status, stderr) = wait_for(child, &run, 60);
    assert_eq!(status.code(), Some(1), "{stderr}");
    // Within the heartbeat timeout (3 s) plus a few seconds.
    assert!(killed.elapsed() < Duration::from_secs(3 + 5), "took {:?}", killed.elapsed());
    let summary = json(&run.join("summary.json"));
    let failure = summary["failure"].as_str().unwrap();
    assert!(failure.starts_with(&format!("{label} was killed by a signal")), "{failure}");
    assert!(stderr.contains(&format!("failed: {label} was killed by a signal")), "{stderr}");
    assert_eq!(summary["restarts"].as_array().unwrap().len(), 0);
    assert!(!run.join("restarts.json").exists());
    wait_gone(&tag);
}

#[test]
fn with_on_failure_restart_killed_processes_resume_from_the_last_checkpoint_and_the_job_finishes() {
    let tag = fresh_tag();
    let dir = scratch("kill-restart");
    let key = dir.join("ck.key");
    let ck = dir.join("ckpt");
    let job = JobFile::local()
        .ports(31212, 31222)
        .set("training", "on_failure", "restart")
        .set("training", "max_restarts", 2)
        // 4 chunks per shard: a process killed mid-step leaves chunks of
        // two versions behind, and the restart must come from a whole step.
        .set("training", "chunk_kib", 4)
        .checkpoint(&ck, None)
        .set("checkpoint", "every_steps", 15)
        .set("checkpoint", "keep_last", 2)
        .write(dir.join("job.toml"));
    // No key_file: within one launch the launcher keeps the checkpoint key
    // in memory, so restarts need no key on disk.
    assert!(!key.exists());
    let run = dir.join("run");
    let child = spawn_launch(&tag, &job, &run);

    // First failure: a worker, right after the first committed checkpoint.
    until(60, "the first checkpoint", || checkpoint_lines(&run) >= 1);
    let worker = kill_agent(&tag, "wd-worker-0", None);
    // Second failure: a server of the restarted job, after it committed a
    // checkpoint of its own.
    until(60, "the first restart", || run.join("restarts.json").exists());
    let seen = checkpoint_lines(&run);
    until(60, "a checkpoint after the restart", || checkpoint_lines(&run) > seen);
    kill_agent(&tag, "wd-server-1", None);
    let _ = worker;

    let (status, stderr) = wait_for(child, &run, 180);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "succeeded", "{summary}");
    let restarts = summary["restarts"].as_array().unwrap().clone();
    assert_eq!(restarts.len(), 2, "{summary}");
    assert_eq!(json(&run.join("restarts.json")), summary["restarts"]);
    assert!(restarts[0]["cause"].as_str().unwrap().contains("localhost/worker[0]"), "{}", restarts[0]);
    assert!(restarts[1]["cause"].as_str().unwrap().contains("localhost/server[1]"), "{}", restarts[1]);
    let first = restarts[0]["resumed_from_step"].as_u64().expect("the first restart resumed from a checkpoint");
    let second = restarts[1]["resumed_from_step"].as_u64().expect("the second restart resumed from a checkpoint");
    assert!(first >= 15 && first.is_multiple_of(15), "{first}");
    assert!(second > first && second.is_multiple_of(15), "{first} then {second}");
    // No update the launcher said was saved is lost: each restart resumed
    // from the newest checkpoint announced before its failure, or from a
    // newer one that every server had committed by the time the job stopped
    // (a checkpoint is announced only once all its manifests are written).
    for (n, resumed) in [(1, first), (2, second)] {
        let before = &stderr[..stderr.find(&format!("restarting ({n} of 2)")).unwrap()];
        let newest = before
            .lines()
            .filter_map(|l| l.trim().strip_prefix("checkpoint at step "))
            .filter_map(|l| l.split(':').next()?.parse::<u64>().ok())
            .max();
        let newest = newest.unwrap_or_else(|| panic!("restart {n}: no checkpoint was announced before it"));
        assert!(resumed >= newest, "restart {n} resumed from step {resumed}, before the announced {newest}");
    }
    assert!(stderr.contains("restarting (1 of 2)") && stderr.contains("restarting (2 of 2)"), "{stderr}");
    // Each attempt's logs are kept apart.
    for sub in ["", "restart-1", "restart-2"] {
        let log = run.join("logs").join(sub).join("localhost-worker-0.log");
        assert!(log.is_file(), "{}", log.display());
    }
    // Every epoch exactly once in the metrics, and the model trained.
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let epochs: Vec<&str> = metrics.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(epochs, ["1", "2", "3", "4", "5"], "{metrics}");
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.7, "{summary}");
    assert!(run.join("model/model.safetensors").is_file());
    wait_gone(&tag);
}

#[test]
fn restarts_stop_at_max_restarts_and_the_failure_says_so() {
    let tag = fresh_tag();
    let dir = scratch("kill-exhaust");
    let ck = dir.join("ckpt");
    let job = JobFile::local()
        .ports(31224, 31234)
        .epochs(100000)
        .set("training", "on_failure", "restart")
        .set("training", "max_restarts", 1)
        .checkpoint(&ck, None)
        // No checkpoint is due before the failures.
        .set("checkpoint", "every_steps", 1000000)
        .write(dir.join("job.toml"));
    let run = dir.join("run");
    let child = spawn_launch(&tag, &job, &run);
    // Killed before any checkpoint: the restart starts from the beginning.
    let first = kill_agent(&tag, "wd-worker-1", None);
    until(60, "the restart", || run.join("restarts.json").exists());
    kill_agent(&tag, "wd-worker-1", Some(first));
    let (status, stderr) = wait_for(child, &run, 60);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let summary = json(&run.join("summary.json"));
    let failure = summary["failure"].as_str().unwrap();
    assert!(failure.contains("localhost/worker[1]") && failure.contains("max_restarts = 1"), "{failure}");
    let restarts = summary["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 1);
    assert!(restarts[0]["resumed_from_step"].is_null(), "{}", restarts[0]);
    assert!(stderr.contains("starts from the beginning"), "{stderr}");
    wait_gone(&tag);
}
