//! The least-privilege agent, checked from outside on live processes.
//!
//! These tests need root (CI runs as root). Without it they fail, unless
//! `WARDEN_ALLOW_UNPRIVILEGED_TESTS=1` says the run knowingly skips them.

use std::os::unix::process::CommandExt;
use std::process::Command;

use warden_agent::host::harden::parse_status;
use warden_tests::{
    Procs, bin, fresh_tag, job_in, job_table, repo_root, require_root, scratch, start_long_job, wait_gone,
};

#[test]
fn every_training_process_runs_with_nothing() {
    if !require_root() {
        return;
    }
    let tag = fresh_tag();
    let dir = scratch("privilege");
    let (launcher, run) = start_long_job(&tag, &dir, (29900, 29920));
    let pids = Procs::agents(&tag).pids();
    assert_eq!(pids.len(), 5, "{pids:?}");
    for pid in &pids {
        // Every thread, not just the main one.
        let tasks: Vec<_> =
            std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(tasks.len() > 1, "the runtime's threads exist");
        for task in tasks {
            let st = parse_status(&std::fs::read_to_string(task.join("status")).unwrap()).unwrap();
            assert!(!st.uids.contains(&0), "{task:?}: Uid {:?}", st.uids);
            assert!(!st.gids.contains(&0), "{task:?}: Gid {:?}", st.gids);
            for (name, mask) in &st.caps {
                assert_eq!(*mask, 0, "{task:?}: {name} = {mask:x}");
            }
            assert_eq!(st.no_new_privs, 1, "{task:?}");
            assert_eq!(st.seccomp, 2, "{task:?}");
        }
        // No key material in argv or the environment.
        for what in ["cmdline", "environ"] {
            let bytes = std::fs::read(format!("/proc/{pid}/{what}")).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for secret in ["PRIVATE KEY", "BEGIN", "CERTIFICATE"] {
                assert!(!text.contains(secret), "/proc/{pid}/{what} holds {secret}");
            }
        }
    }
    // The job directories (as root, where SSH hosts keep them) are private
    // to the job's uid.
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    let nodes = std::path::Path::new("/var/lib/warden/jobs").join(plan["job_id"].as_str().unwrap());
    let (mut sockets, mut job) = (Vec::new(), None);
    for entry in std::fs::read_dir(&nodes).unwrap() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.file_type().is_socket() {
            sockets.push((entry.path(), meta));
            continue;
        }
        assert!(meta.is_dir(), "{:?}", entry.path());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_ne!(meta.uid(), 0);
        job = Some((meta.uid(), meta.gid()));
    }
    // Beside them, each server's Unix-domain socket for the workers of its
    // host: the job uid's and 0600, in a directory of root's, so another
    // uid cannot connect and the job's own uid (its programs included) can
    // connect but not remove or replace it.
    let (uid, gid) = job.unwrap();
    assert_eq!(sockets.len(), 2, "both servers serve their host's workers on a socket: {sockets:?}");
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::fs::metadata(&nodes).unwrap();
        assert_eq!((dir.uid(), dir.permissions().mode() & 0o777), (0, 0o711));
        for (sock, meta) in &sockets {
            assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (uid, 0o600), "{sock:?}");
        }
    }
    let python_as = |uid: u32, gid: u32, code: &str, sock: &std::path::Path| {
        let out = Command::new("python3").args(["-c", code]).arg(sock).uid(uid).gid(gid).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])";
    for (sock, _) in &sockets {
        let (ok, err) = python_as(65534, 65534, connect, sock);
        assert!(!ok && err.contains("PermissionError"), "uid 65534 reached {sock:?}: {err}");
        let (ok, err) = python_as(uid, gid, connect, sock);
        assert!(ok, "the job's uid connects to {sock:?}: {err}");
        for replace in
            ["import os, sys; os.unlink(sys.argv[1])", "import os, sys; os.rename(sys.argv[1], sys.argv[1] + '.x')"]
        {
            let (ok, err) = python_as(uid, gid, replace, sock);
            assert!(!ok && err.contains("PermissionError"), "the job's uid moved {sock:?}: {err}");
        }
    }
    // The job's firewall table admits only the job's peers to its ports.
    let table = job_table(&run);
    let rules = warden_agent::host::firewall::show(&table).unwrap();
    assert!(rules.contains("tcp dport { 29900, 29901, 29902 } ip saddr 127.0.0.1 accept"), "{rules}");
    assert!(rules.contains("tcp dport { 29900, 29901, 29902 } drop"), "{rules}");
    // And on this host only the job's uid (or root) may connect to them.
    assert!(rules.contains("meta skuid != { 0, 2"), "{rules}");
    // Ctrl-C: the launcher stops everything, removes the table and says so.
    assert!(Command::new("kill").args(["-INT", &launcher.id().to_string()]).status().unwrap().success());
    let out = launcher.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = std::fs::read_to_string(run.join("summary.json")).unwrap();
    assert!(summary.contains("interrupted"), "{summary}");
    wait_gone(&tag);
    assert!(!warden_agent::host::firewall::list().unwrap().contains(&table), "{table} left behind");
}

#[test]
fn a_crashed_jobs_table_is_listed_and_removed_by_command() {
    if !require_root() {
        return;
    }
    let tag = fresh_tag();
    let dir = scratch("crash-table");
    let (mut launcher, run) = start_long_job(&tag, &dir, (29950, 29960));
    let table = job_table(&run);
    // SIGKILL: no teardown runs, so the table stays.
    assert!(Command::new("kill").args(["-9", &launcher.id().to_string()]).status().unwrap().success());
    let _ = launcher.wait();
    wait_gone(&tag);
    let list = Command::new(bin("warden")).args(["firewall", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&format!("inet {table}")));
    let clean = Command::new(bin("warden")).args(["firewall", "clean", &table]).output().unwrap();
    assert_eq!(clean.status.code(), Some(0), "{}", String::from_utf8_lossy(&clean.stderr));
    assert!(!warden_agent::host::firewall::list().unwrap().contains(&table));
    let bad = Command::new(bin("warden")).args(["firewall", "clean", "filter"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1), "only warden tables can be removed");
}

#[test]
fn started_without_root_the_job_runs_and_says_so() {
    if !require_root() {
        return;
    }
    // Run the launcher as `nobody` (65534) in a directory it owns, with
    // copies of the binaries and the data there: the checkout may sit where
    // nobody can enter (a clone in /root).
    let dir = scratch("unprivileged");
    let data = repo_root().join("data/fashion-mnist-small");
    let staged = dir.join("data");
    std::fs::create_dir(&staged).unwrap();
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), staged.join(entry.file_name())).unwrap();
    }
    let bin_dir = dir.join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    for name in ["warden", "warden-agent"] {
        std::fs::copy(bin(name), bin_dir.join(name)).unwrap();
    }
    let job = job_in(&dir, (29930, 29940), &[("epochs = 5", "epochs = 1")]);
    let text = std::fs::read_to_string(&job).unwrap().replace(data.to_str().unwrap(), staged.to_str().unwrap());
    std::fs::write(&job, text).unwrap();
    assert!(Command::new("chown").args(["-R", "65534:65534", dir.to_str().unwrap()]).status().unwrap().success());
    let run = dir.join("run");
    let out = Command::new(bin_dir.join("warden"))
        .args(["launch".as_ref(), job.as_os_str(), "--local".as_ref(), "--run-dir".as_ref(), run.as_os_str()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let warnings = stderr.matches("warning: warden-agent is not running as root").count();
    assert_eq!(warnings, 1, "the warning is shown exactly once: {stderr}");
    // ... and not again as five agents' log lines.
    let copies = stderr.matches("warden-agent is not running as root").count();
    assert_eq!(copies, 1, "the agents' copies reached the terminal: {stderr}");
    assert!(stderr.contains("succeeded:"));
}
